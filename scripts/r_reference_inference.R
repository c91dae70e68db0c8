# Reference numbers for covmodules' inference (tests/test_inference.py), written to
# tests/data/inference_reference.json:
#   Rscript scripts/r_reference_inference.R
# lme4 + lmerTest on sleepstudy and Orthodont, read from tests/data/*.csv with R's level order.
# For each model: REML and ML logLik, fixed effects, VarCorr, ranef(condVar = TRUE), Wald and
# profile confint (lme4's spline-interpolated profile and, as an exact reference, the roots of
# the ML deviance profile found with bobyqa + uniroot), lmerTest's Satterthwaite table;
# anova() likelihood-ratio tables of nested pairs.
suppressPackageStartupMessages({library(lme4); library(lmerTest); library(jsonlite)})

levels_json <- fromJSON("tests/data/levels.json")
read_data <- function(name) {
  df <- read.csv(file.path("tests/data", paste0(name, ".csv")), stringsAsFactors = FALSE)
  for (col in names(levels_json[[name]]$factors))
    df[[col]] <- factor(df[[col]], levels = levels_json[[name]]$factors[[col]]$levels)
  df
}
datasets <- list(sleepstudy = read_data("sleepstudy"), Orthodont = read_data("Orthodont"))
tight <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e5),
                     check.conv.singular = "ignore", calc.derivs = FALSE)
level <- 0.95
crit <- qchisq(level, 1)

fit_call <- function(formula, data_name, REML) {
  call <- sprintf("lmer(%s, data = %s, REML = %s)", formula, data_name, REML)
  fm <- lmer(as.formula(formula), data = datasets[[data_name]], REML = REML, control = tight)
  list(fm = fm, call = call)
}

# exact profile roots of the ML deviance on lme4's sd / correlation scale (devfun2: the
# deviance at sd-scale parameters with beta profiled out), each by bobyqa inside uniroot
exact_profile <- function(fm_ml) {
  dd <- lme4:::devfun2(fm_ml, useSc = TRUE, signames = FALSE)
  base <- attr(dd, "basedev")
  opt <- attr(dd, "optimum")[seq_len(length(attr(dd, "optimum")) - length(fixef(fm_ml)))]
  stopifnot(abs(dd(opt) - base) < 1e-6)
  names_p <- names(opt)
  is_cor <- grepl("^cor_", names_p)
  lower <- ifelse(is_cor, -1, 0); upper <- ifelse(is_cor, 1, Inf)
  profiled <- function(w, value, start) {
    fn <- function(x) {
      p <- numeric(length(opt)); p[w] <- value; p[-w] <- x
      tryCatch(dd(p), error = function(e) 1e10)     # outside the positive-definite region
    }
    r <- minqa::bobyqa(start, fn, lower = lower[-w] + 1e-12 * is_cor[-w],
                       upper = upper[-w] - 1e-12 * is_cor[-w],
                       control = list(rhoend = 1e-11, maxfun = 1e5))
    # bobyqa can stop short near the bounds: also nlminb in unconstrained coordinates
    # (log sd, atanh cor), and keep the lower minimum
    cor <- is_cor[-w]
    to <- function(x) ifelse(cor, atanh(pmin(pmax(x, -1 + 1e-9), 1 - 1e-9)), log(pmax(x, 1e-12)))
    from <- function(v) ifelse(cor, tanh(v), exp(v))
    r2 <- nlminb(to(start), function(v) fn(from(v)),
                 control = list(eval.max = 1e4, iter.max = 1e4, rel.tol = 1e-14))
    min(r$fval, r2$objective) - base - crit
  }
  out <- list()
  for (w in seq_along(opt)) {
    start <- opt[-w]
    f <- function(v) profiled(w, v, start)
    span <- if (is_cor[w]) c(-1 + 1e-9, 1 - 1e-9) else c(1e-6 * opt[w], 10 * opt[w])
    lo <- if (f(span[1]) < 0) span[1] else uniroot(f, c(span[1], opt[w]), tol = 1e-12)$root
    hi <- if (f(span[2]) < 0) span[2] else uniroot(f, c(opt[w], span[2]), tol = 1e-12)$root
    out[[names_p[w]]] <- c(lo, hi)
  }
  # fixed effects: ML refits with beta_j = c as an offset
  X <- getME(fm_ml, "X"); y <- getME(fm_ml, "y"); re <- findbars(formula(fm_ml))
  rterms <- paste(sprintf("(%s)", sapply(re, deparse)), collapse = " + ")
  d <- model.frame(fm_ml)
  for (j in seq_len(ncol(X))) {
    dev_at <- function(b) {
      d$.y <- y - b * X[, j]; d$.X <- X[, -j, drop = FALSE]
      f <- as.formula(paste(".y ~ 0 + .X +", rterms))
      deviance(lmer(f, data = d, REML = FALSE, control = tight)) - deviance(fm_ml) - crit
    }
    b <- fixef(fm_ml)[j]; se <- sqrt(diag(as.matrix(vcov(fm_ml))))[j]
    out[[colnames(X)[j]]] <- c(uniroot(dev_at, c(b - 6 * se, b), tol = 1e-12)$root,
                               uniroot(dev_at, c(b, b + 6 * se), tol = 1e-12)$root)
  }
  out
}

model_entry <- function(formula, data_name, id) {
  reml <- fit_call(formula, data_name, TRUE); fm <- reml$fm
  ml <- fit_call(formula, data_name, FALSE)
  vc <- as.data.frame(VarCorr(fm))
  re <- as.data.frame(ranef(fm, condVar = TRUE))
  wald <- confint(fm, method = "Wald", parm = "beta_", level = level)
  prof <- confint(fm, method = "profile", oldNames = FALSE, level = level)
  lt <- summary(lmerTest::lmer(as.formula(formula), data = datasets[[data_name]], REML = TRUE,
                               control = tight))$coefficients
  list(id = id, call = reml$call, call_ml = ml$call, dataset = data_name,
       logLik_REML = as.numeric(logLik(fm)), logLik_ML = as.numeric(logLik(ml$fm)),
       fixef = as.list(fixef(fm)),
       varcorr = list(grp = vc$grp, var1 = vc$var1, var2 = vc$var2, vcov = vc$vcov,
                      sdcor = vc$sdcor),
       ranef = list(grpvar = as.character(re$grpvar), term = as.character(re$term),
                    grp = as.character(re$grp), condval = re$condval, condsd = re$condsd),
       confint_wald = list(call = sprintf("confint(fm, method = \"Wald\", parm = \"beta_\")"),
                           names = rownames(wald), lower = wald[, 1], upper = wald[, 2]),
       confint_profile = list(call = "confint(fm, method = \"profile\", oldNames = FALSE)",
                              names = rownames(prof), lower = prof[, 1], upper = prof[, 2]),
       confint_profile_exact = exact_profile(ml$fm),
       satterthwaite = list(call = "summary(lmerTest::lmer(<formula>, REML = TRUE))$coefficients",
                            names = rownames(lt), estimate = lt[, "Estimate"],
                            std_error = lt[, "Std. Error"], df = lt[, "df"],
                            t = lt[, "t value"], p_value = lt[, "Pr(>|t|)"]))
}

anova_entry <- function(f0, f1, data_name) {
  m0 <- fit_call(f0, data_name, TRUE)$fm; m1 <- fit_call(f1, data_name, TRUE)$fm
  a <- suppressMessages(anova(m0, m1))
  list(call = sprintf("anova(lmer(%s), lmer(%s))  # both REML = TRUE, data = %s", f0, f1,
                      data_name),
       npar = a$npar, AIC = a$AIC, BIC = a$BIC, logLik = a$logLik, deviance = a$deviance,
       Chisq = a$Chisq, Df = a$Df, p = a[["Pr(>Chisq)"]])
}

out <- list(
  R = R.version.string, lme4 = as.character(packageVersion("lme4")),
  lmerTest = as.character(packageVersion("lmerTest")), level = level,
  models = list(
    model_entry("Reaction ~ Days + (Days | Subject)", "sleepstudy", "sleep_corr"),
    model_entry("Reaction ~ Days + (1 | Subject)", "sleepstudy", "sleep_ri"),
    model_entry("distance ~ age * Sex + (age | Subject)", "Orthodont", "ortho_corr"),
    model_entry("distance ~ age + Sex + (1 | Subject)", "Orthodont", "ortho_ri")),
  anova = list(
    anova_entry("Reaction ~ Days + (1 | Subject)", "Reaction ~ Days + (Days | Subject)",
                "sleepstudy"),
    anova_entry("distance ~ age + Sex + (1 | Subject)", "distance ~ age * Sex + (age | Subject)",
                "Orthodont")))
writeLines(toJSON(out, digits = NA, auto_unbox = TRUE, na = "null", pretty = TRUE),
           "tests/data/inference_reference.json")
cat("wrote tests/data/inference_reference.json\n")
