# Seed reports (experiments/report.py): `make report FAMILY=full SEEDS=10`, then `make verify-report`.
.PHONY: report verify-report

CONFIG ?=
REPORT ?=
REPORT_ARGS ?=
VERIFY_ARGS ?=
REPORTS_DIR ?= reports
# FAMILY goes to the command only when typed (or when no CONFIG names one), so a CONFIG file's family stands
_report_given = $(filter command line environment,$(origin $(1)))

report: $(STAMP) ## seeds x (GD + EM) -> reports/NAME: FAMILY=full|...|all SEEDS=10 [JOBS=cores] [CONFIG=file] [DATA=file.csv COLUMNS= COMPONENTS=K] [SEED=42 DATA_SEED=0] [REPORT_ARGS=]
	$(PY) -m experiments.report $(if $(or $(call _report_given,FAMILY),$(if $(CONFIG),,1)),--family $(FAMILY)) \
		--seeds $(SEEDS) $(if $(JOBS),--jobs $(JOBS)) $(if $(CONFIG),--config $(CONFIG)) \
		$(if $(call _report_given,SEED),--seed $(SEED)) $(if $(call _report_given,DATA_SEED),--data-seed $(DATA_SEED)) \
		$(if $(DATA),--data $(DATA)) $(if $(COLUMNS),--columns $(COLUMNS)) $(if $(COMPONENTS),--components $(COMPONENTS)) \
		$(REPORT_ARGS)

verify-report: $(STAMP) ## re-run a report from its manifest, compare every number: [REPORT=reports/NAME, default newest] [VERIFY_ARGS=]
	@report="$(REPORT)"; \
	if [ -z "$$report" ]; then \
		report=$$(ls -1t $(REPORTS_DIR)/*/manifest.json 2>/dev/null | head -n 1); report=$${report%/manifest.json}; \
	fi; \
	if [ -z "$$report" ]; then \
		echo "verify-report: no report in $(REPORTS_DIR)/; run make report first or pass REPORT=path" >&2; exit 2; \
	fi; \
	echo "$(PY) -m experiments.report --verify $$report $(if $(JOBS),--jobs $(JOBS)) $(VERIFY_ARGS)"; \
	$(PY) -m experiments.report --verify "$$report" $(if $(JOBS),--jobs $(JOBS)) $(VERIFY_ARGS)
