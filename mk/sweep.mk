# Clamp sweep (experiments/sweep.py): `make clamp-sweep FAMILY=full [SEEDS=5] [DATASETS=a,b] [JOBS=N]`,
# then `make verify-clamp-sweep [SWEEP=sweeps/NAME]`. See README "Clamp sweep".
.PHONY: clamp-sweep verify-clamp-sweep

DATASETS ?=
SWEEP ?=
SWEEP_ARGS ?=
SWEEPS_DIR ?= sweeps
# SEEDS has a default of 10 for reports; the sweep's own default (5) holds unless SEEDS is typed
_sweep_given = $(filter command line environment,$(origin $(1)))

clamp-sweep: $(STAMP) ## clamp x seeds x {full, mini-batch} x {reset on, off} -> sweeps/NAME: FAMILY=full|all [SEEDS=5] [DATASETS=a,b] [JOBS=cores]
	$(PY) -m experiments.sweep --family $(FAMILY) $(if $(JOBS),--jobs $(JOBS)) $(if $(call _sweep_given,SEEDS),--seeds $(SEEDS)) \
		$(if $(DATASETS),--datasets $(DATASETS)) $(SWEEP_ARGS)

verify-clamp-sweep: $(STAMP) ## re-run a clamp sweep from its manifest and compare every number [SWEEP=sweeps/NAME, default newest] [JOBS=cores]
	@sweep="$(SWEEP)"; \
	if [ -z "$$sweep" ]; then \
		sweep=$$(ls -1t $(SWEEPS_DIR)/*/manifest.json 2>/dev/null | head -n 1); sweep=$${sweep%/manifest.json}; \
	fi; \
	if [ -z "$$sweep" ]; then \
		echo "verify-clamp-sweep: no sweep in $(SWEEPS_DIR)/; run make clamp-sweep first or pass SWEEP=path" >&2; exit 2; \
	fi; \
	echo "$(PY) -m experiments.sweep --verify $$sweep $(if $(JOBS),--jobs $(JOBS))"; \
	$(PY) -m experiments.sweep --verify "$$sweep" $(if $(JOBS),--jobs $(JOBS))
