# Optuna studies (studies/): `make study FAMILY=full`, `make study-worker`, `make dashboard`. See README.md.
.PHONY: study study-worker dashboard

STUDY_ARGS ?=
WORKER_ARGS ?=
RETRIES ?= 1
BATCH ?=
DASHBOARD_PORT ?= 8080

study: $(STAMP) ## Optuna study of clamp and learning rates: FAMILY=full|...|all [TRIALS=40] [JOBS=1] [BATCH=16] [STORAGE=url] [DATA=file.csv COLUMNS= COMPONENTS=K]
	$(PY) -m studies.run --family $(FAMILY) $(if $(JOBS),--jobs $(JOBS)) $(if $(TRIALS),--trials $(TRIALS)) $(if $(BATCH),--batch $(BATCH)) \
		$(if $(STORAGE),--storage $(STORAGE)) $(if $(DATA),--data $(DATA) --data-seed $(DATA_SEED)) \
		$(if $(COLUMNS),--columns $(COLUMNS)) $(if $(COMPONENTS),--components $(COMPONENTS)) $(STUDY_ARGS)

study-worker: $(STAMP) ## one more worker on an existing study (any machine): FAMILY=full STORAGE=url [TRIALS=40] [JOBS=1] [BATCH=16] [RETRIES=1]
	$(PY) -m studies.run --worker --family $(FAMILY) $(if $(JOBS),--jobs $(JOBS)) --retries $(RETRIES) $(if $(BATCH),--batch $(BATCH)) \
		$(if $(TRIALS),--trials $(TRIALS)) $(if $(STORAGE),--storage $(STORAGE)) $(WORKER_ARGS)

dashboard: $(STAMP) ## optuna-dashboard on the study storage at http://127.0.0.1:8080 [STORAGE=url] [DASHBOARD_PORT=]
	$(PY) -m studies.dashboard --host 127.0.0.1 --port $(DASHBOARD_PORT) $(if $(STORAGE),--storage $(STORAGE))
