# Reference fits of a small multi-environment trial (no spatial residual) with glmmTMB.
# Writes tests/data/met_small.csv (the simulated data) and tests/data/met_glmmtmb.json.
# Run from the repository root: Rscript scripts/met_glmmtmb.R
suppressMessages({library(glmmTMB); library(jsonlite)})
set.seed(16)
E <- 4; L <- 30; reps <- 2
lambda <- c(1.2, 0.9, -0.6, 0.4); psi <- c(0.3, 0.5, 0.2, 0.4)
u <- outer(rnorm(L), lambda) + matrix(rnorm(L * E), L, E) %*% diag(sqrt(psi))
d <- expand.grid(rep = seq_len(reps), genotype = seq_len(L), env = seq_len(E))
d$y <- 10 + 2 * d$env + u[cbind(d$genotype, d$env)] + rnorm(nrow(d), sd = 0.7)
d$env <- factor(paste0("E", d$env)); d$genotype <- factor(sprintf("G%02d", d$genotype))
d <- d[order(d$env, d$genotype, d$rep), c("env", "genotype", "rep", "y")]
write.csv(d, "tests/data/met_small.csv", row.names = FALSE)

fits <- list(
  us = list(call = "glmmTMB(y ~ 0 + env + us(0 + env | genotype), data = d, REML = TRUE)"),
  fa1 = list(call = paste("glmmTMB(y ~ 0 + env + rr(0 + env | genotype, d = 1) +",
                          "diag(0 + env | genotype), data = d, REML = TRUE)")))
for (k in names(fits)) {
  f <- eval(parse(text = fits[[k]]$call))
  vc <- VarCorr(f)$cond
  Sigma <- Reduce(`+`, lapply(vc, function(m) unname(as.matrix(m))))
  fits[[k]]$logLik_REML <- as.numeric(logLik(f))
  fits[[k]]$Sigma <- Sigma
  fits[[k]]$sigma2 <- sigma(f)^2
  fits[[k]]$beta <- unname(fixef(f)$cond)
}
fits$R <- R.version.string
fits$glmmTMB <- as.character(packageVersion("glmmTMB"))
write(toJSON(fits, digits = NA, auto_unbox = TRUE, pretty = TRUE), "tests/data/met_glmmtmb.json")
