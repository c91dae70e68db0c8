# Reference predictions (lme4's predict.merMod) for covmodules' FitResult.predict:
# tests/data/predict_reference.json.   Rscript scripts/r_reference_predict.R   (R 4.2.2, lme4)
suppressPackageStartupMessages({library(lme4); library(jsonlite)})
ortho <- as.data.frame(nlme::Orthodont)
ortho$Subject <- factor(as.character(ortho$Subject))
case <- function(id, call, fit, newdata) {
  list(id = id, call = call, newdata = newdata,
       conditional = unname(predict(fit, newdata, allow.new.levels = TRUE)),
       population = unname(predict(fit, newdata, re.form = NA)),
       fitted = unname(fitted(fit)))
}
ctl <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhobeg = 1e-3, rhoend = 1e-12))
sleep_new <- data.frame(Days = c(0, 4.5, 12, 3, 7), Subject = c("308", "309", "372", "999", "999"))
ortho_new <- data.frame(age = c(9, 15, 11, 8, 12), Sex = c("Male", "Female", "Female", "Male", "Female"),
                        Subject = c("M01", "F05", "X01", "M16", "Y02"))
out <- list(generated = format(Sys.time(), tz = "UTC"), R_version = R.version.string,
            lme4 = as.character(packageVersion("lme4")), cases = list(
  case("sleepstudy", "lmer(Reaction ~ Days + (Days | Subject), sleepstudy)",
       lmer(Reaction ~ Days + (Days | Subject), sleepstudy, control = ctl), sleep_new),
  case("orthodont", "lmer(distance ~ age * Sex + (age | Subject), Orthodont)",
       lmer(distance ~ age * Sex + (age | Subject), ortho, control = ctl), ortho_new),
  case("orthodont_poly", "lmer(distance ~ poly(age, 2) + Sex + (1 | Subject), Orthodont)",
       lmer(distance ~ poly(age, 2) + Sex + (1 | Subject), ortho, control = ctl), ortho_new)))
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE, dataframe = "columns"),
           "tests/data/predict_reference.json")
