# Scaling out (README "Scaling out"): one MLflow tracking server that workers on many machines report to.
#   make server                                    # http://127.0.0.1:5001, SQLite store out/mlflow-server/mlflow.db
#   make server HOST=0.0.0.0 PORT=5001 MLFLOW_BACKEND=postgresql://mlflow@db-host/mlflow
# Workers then run with MLFLOW_TRACKING_URI=http://<this host>:5001 (see `make study-worker`).
.PHONY: server

# HOST and PORT are read from the command line only (`make server HOST=0.0.0.0`), so that a default another
# mk/*.mk file gives them (`make ui` uses port 5000) cannot move this server.
SERVER_HOST := $(if $(filter command line,$(origin HOST)),$(HOST),127.0.0.1)
SERVER_PORT := $(if $(filter command line,$(origin PORT)),$(PORT),5001)
MLFLOW_BACKEND ?= sqlite:///$(CURDIR)/out/mlflow-server/mlflow.db
MLFLOW_ARTIFACTS ?= $(CURDIR)/out/mlflow-server/artifacts
SERVER_WORKERS ?= 2
ALLOWED_HOSTS ?=

server: $(STAMP) ## MLflow tracking server [HOST=127.0.0.1] [PORT=5001] [MLFLOW_BACKEND=sqlite:///...|postgresql://...] [MLFLOW_ARTIFACTS=dir] [ALLOWED_HOSTS=name,...]
	mkdir -p '$(MLFLOW_ARTIFACTS)' '$(CURDIR)/out/mlflow-server'
	@echo "MLflow server: http://$(SERVER_HOST):$(SERVER_PORT) (store $(MLFLOW_BACKEND), artifacts $(MLFLOW_ARTIFACTS))"
	MLFLOW_DISABLE_TELEMETRY=true $(VENV)/bin/mlflow server \
		--backend-store-uri '$(subst postgres://,postgresql+psycopg://,$(subst postgresql://,postgresql+psycopg://,$(MLFLOW_BACKEND)))' \
		--serve-artifacts --artifacts-destination '$(MLFLOW_ARTIFACTS)' \
		--host $(SERVER_HOST) --port $(SERVER_PORT) --workers $(SERVER_WORKERS) \
		$(if $(ALLOWED_HOSTS),--allowed-hosts '$(ALLOWED_HOSTS)') $(SERVER_ARGS)
