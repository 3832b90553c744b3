# Optuna studies (studies/): `make study FAMILY=full`, `make dashboard`. See docs/studies.md.
.PHONY: study dashboard

STUDY_ARGS ?=
DASHBOARD_PORT ?= 8080

study: $(STAMP) ## Optuna study of clamp and learning rates: FAMILY=full|...|all [TRIALS=40] [JOBS=1] [STORAGE=url]
	$(PY) -m studies.run --family $(FAMILY) --jobs $(JOBS) $(if $(TRIALS),--trials $(TRIALS)) \
		$(if $(STORAGE),--storage $(STORAGE)) $(STUDY_ARGS)

dashboard: $(STAMP) ## optuna-dashboard on the study storage at http://127.0.0.1:8080 [STORAGE=url] [DASHBOARD_PORT=]
	$(PY) -m studies.dashboard --host 127.0.0.1 --port $(DASHBOARD_PORT) $(if $(STORAGE),--storage $(STORAGE))
