# Reference numbers for the formula front end (covmodules.lmm): tests/data/formula_reference.json.
#   Rscript scripts/r_reference_formula.R      (R 4.2.2, lme4, nlme, glmmTMB)
# Writes tests/data/cake.csv (lme4's cake) and tests/data/sim_structured.csv (simulated below).
suppressPackageStartupMessages({library(lme4); library(nlme); library(glmmTMB); library(jsonlite)})
out <- list(generated = format(Sys.time(), tz = "UTC"), R_version = R.version.string,
            packages = list(lme4 = as.character(packageVersion("lme4")),
                            nlme = as.character(packageVersion("nlme")),
                            glmmTMB = as.character(packageVersion("glmmTMB"))))
data(cake, package = "lme4")
write.csv(cake[, c("replicate", "recipe", "temperature", "angle")], "tests/data/cake.csv",
          row.names = FALSE)
ortho <- as.data.frame(nlme::Orthodont)
ortho$Subject <- factor(as.character(ortho$Subject))   # unordered, as tests read it

# model matrices: R's column names and values
mm <- function(rhs, data) {
  X <- model.matrix(as.formula(paste("~", rhs)), data)
  list(rhs = rhs, names = colnames(X), matrix = unname(X))
}
out$model_matrix <- list(
  mm("age * Sex", ortho), mm("Sex/age - 1", ortho), mm("poly(age, 2) + scale(age)", ortho),
  mm("I(age^2) + log(age)", ortho), mm("factor(age) * Sex", ortho), mm("C(Sex)", ortho),
  mm("recipe * temperature", cake), mm("0 + temperature", cake))

fits <- list()
lmer_ref <- function(id, call, fit) {
  vc <- as.data.frame(VarCorr(fit))
  list(id = id, call = call, logLik = as.numeric(logLik(fit)),
       fixed_effects = as.list(fixef(fit)),
       varcorr = lapply(seq_len(nrow(vc)), function(i) as.list(vc[i, ])))
}
f <- lmer(angle ~ recipe * temperature + (1 | recipe:replicate), cake, REML = TRUE)
fits$cake <- lmer_ref("cake", "lmer(angle ~ recipe * temperature + (1 | recipe:replicate), cake)", f)
f <- lmer(angle ~ recipe + temperature + (1 | replicate/recipe), cake, REML = TRUE)
fits$cake_nested <- lmer_ref("cake_nested",
  "lmer(angle ~ recipe + temperature + (1 | replicate/recipe), cake)", f)
f <- lmer(distance ~ age * Sex + (age | Subject), ortho, REML = TRUE,
          control = lmerControl(optimizer = "bobyqa", optCtrl = list(rhobeg = 1e-3, rhoend = 1e-12)))
fits$orthodont_slope <- lmer_ref("orthodont_slope", "lmer(distance ~ age * Sex + (age | Subject), Orthodont)", f)
f <- lmer(distance ~ poly(age, 2) + scale(age^2) + Sex + (1 | Subject), ortho, REML = TRUE)
fits$orthodont_poly <- lmer_ref("orthodont_poly",
  "lmer(distance ~ poly(age, 2) + scale(age^2) + Sex + (1 | Subject), Orthodont)", f)
sleep <- lme4::sleepstudy
f <- lmer(Reaction ~ Days + (Days || Subject), sleep, REML = TRUE)
fits$sleep_indep <- lmer_ref("sleep_indep", "lmer(Reaction ~ Days + (Days || Subject), sleepstudy)", f)
sleep$w <- rep(c(1, 2, 0.5), 60)
f <- lmer(Reaction ~ Days + (Days | Subject), sleep, weights = w, REML = TRUE)
fits$sleep_weights <- lmer_ref("sleep_weights",
  "lmer(Reaction ~ Days + (Days | Subject), sleepstudy, weights = rep(c(1, 2, 0.5), 60))", f)
f <- lmer(Reaction ~ Days + (1 | Subject), sleep, REML = FALSE)
fits$sleep_ml <- lmer_ref("sleep_ml", "lmer(Reaction ~ Days + (1 | Subject), sleepstudy, REML = FALSE)", f)

# nlme residual correlations
gls_ref <- function(id, call, fit) list(id = id, call = call, logLik = as.numeric(logLik(fit)),
                                       fixed_effects = as.list(coef(fit)))
ovary <- as.data.frame(nlme::Ovary)
f <- gls(follicles ~ sin(2 * pi * Time) + cos(2 * pi * Time), ovary,
         correlation = corCAR1(form = ~ Time | Mare), method = "REML")
fits$ovary_car1 <- gls_ref("ovary_car1", "gls(follicles ~ sin(2 * pi * Time) + cos(2 * pi * Time), Ovary, correlation = corCAR1(form = ~ Time | Mare))", f)
f <- gls(distance ~ age * Sex, ortho, correlation = corSymm(form = ~ 1 | Subject),
         weights = varIdent(form = ~ 1 | age), method = "REML")
fits$orthodont_us <- gls_ref("orthodont_us", "gls(distance ~ age * Sex, Orthodont, correlation = corSymm(form = ~ 1 | Subject), weights = varIdent(form = ~ 1 | age))", f)

# glmmTMB structured random terms on simulated data: 60 subjects x 4 times x 2 replicates
set.seed(14)
S <- 60; Tn <- 4
sim <- expand.grid(rep = 1:2, time = 1:Tn, subject = 1:S)
sd_t <- c(1.0, 1.5, 2.0, 2.5); R <- 0.6^abs(outer(1:Tn, 1:Tn, "-"))
U <- matrix(rnorm(S * Tn), S) %*% chol(diag(sd_t) %*% R %*% diag(sd_t))
sim$x <- round(rnorm(nrow(sim)), 3)
sim$y <- round(2 + 0.5 * sim$x + U[cbind(sim$subject, sim$time)] + rnorm(nrow(sim)), 4)
sim$subject <- sprintf("s%02d", sim$subject)
write.csv(sim[, c("subject", "time", "rep", "x", "y")], "tests/data/sim_structured.csv",
          row.names = FALSE)
for (s in c("us", "diag", "cs", "toep", "ar1", "rr")) {
  term <- if (s == "rr") "rr(0 + factor(time) | subject, d = 1)" else
    sprintf("%s(0 + factor(time) | subject)", s)
  form <- as.formula(paste("y ~ x +", term))
  f <- glmmTMB(form, sim, REML = TRUE)
  fits[[paste0("tmb_", s)]] <- list(id = paste0("tmb_", s),
    call = sprintf("glmmTMB(y ~ x + %s, sim_structured, REML = TRUE)", term),
    formula = paste("y ~ x +", term), logLik = as.numeric(logLik(f)),
    fixed_effects = as.list(fixef(f)$cond), sigma2 = sigma(f)^2,
    cov = unname(VarCorr(f)$cond$subject[, ]), converged = f$fit$convergence == 0)
}
out$fits <- unname(fits)
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE),
           "tests/data/formula_reference.json")
