# Experiment runner (experiments/): `make run`, `make ui`. See README "Experiments".
.PHONY: run ui

RUN_ARGS ?=
UI_PORT ?= 5000
# the tracking store: $MLFLOW_TRACKING_URI, else MLflow's default local database in the project root
TRACKING_URI ?= $(if $(MLFLOW_TRACKING_URI),$(MLFLOW_TRACKING_URI),sqlite:///$(CURDIR)/mlflow.db)
# pass FAMILY/SEED only when typed (make run FAMILY=tied) so that a CONFIG file's values are not overridden
_given = $(filter command line environment,$(origin $(1)))

# SEED seeds the fit (initialization, resets); DATA_SEED the generated data and every train/validation split.
# DATA=file.csv|.npy|.parquet fits your own data (COLUMNS=x,y picks columns; COMPONENTS=K the model's K).
run: $(STAMP) ## one tracked fit: [FAMILY=full] [SEED=42] [DATA_SEED=0] [DATA=file.csv] [COLUMNS=x,y] [COMPONENTS=K] [CONFIG=file] [RUN_ARGS=]
	$(PY) -m experiments.run $(if $(CONFIG),--config $(CONFIG)) \
		$(if $(call _given,FAMILY),--family $(FAMILY)) $(if $(call _given,SEED),--seed $(SEED)) \
		$(if $(call _given,DATA_SEED),--data-seed $(DATA_SEED)) $(if $(DATA),--data $(DATA)) \
		$(if $(COLUMNS),--columns $(COLUMNS)) $(if $(COMPONENTS),--components $(COMPONENTS)) $(RUN_ARGS)

ui: $(STAMP) ## MLflow UI on the tracking store at http://127.0.0.1:5000 [UI_PORT=] [MLFLOW_TRACKING_URI=]
	@test -n "$(MLFLOW_TRACKING_URI)" -o -f mlflow.db || echo "no runs yet: make run first (the UI starts anyway)"
	@echo "MLflow UI: http://127.0.0.1:$(UI_PORT)/#/experiments?workflowType=machine_learning  (the model-training view: runs, charts, logged models)"
	$(PY) -m mlflow ui --backend-store-uri "$(TRACKING_URI)" --host 127.0.0.1 --port $(UI_PORT)
