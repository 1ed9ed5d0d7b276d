# Two entry points, both idempotent, for a fresh Debian machine with Python 3.11 (run as root):
#   make demo   set everything up, open napari with the sample CT and the Kidney cascade widget
#   make test   set everything up, run the whole test suite under a virtual X server
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Qt's xcb platform plugin and napari's OpenGL canvas need these; Xvfb is the X server for tests;
# dicom3tools gives dciodvfy, which checks the DICOM SEG files the tests write.
DEBS   := xvfb xauth libgl1 libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 \
          libxcb-image0 libxcb-render-util0 libxcb-randr0 libxcb-shape0 libxcb-xfixes0 libxcb-cursor0 \
          libfontconfig1 libdbus-1-3 dicom3tools orthanc orthanc-dicomweb
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-fast fuzz lint setup system-deps bench clean

demo: setup
	$(BIN)/kidseg demo

# the whole suite, lint first (what CI runs)
test: setup lint
	xvfb-run -a -s "-screen 0 1600x1200x24" $(BIN)/pytest -q -p no:cacheprovider --durations=15

# the development lane: everything but the tests marked slow (real-volume sweeps, training)
test-fast: setup
	xvfb-run -a -s "-screen 0 1600x1200x24" $(BIN)/pytest -q -p no:cacheprovider -m "not slow"

# the review model's state machine at length (CI runs a fixed 2,000-example profile): random,
# 20,000 examples of up to 40 steps; hypothesis prints the shortest failing sequence it finds
fuzz: setup
	KIDSEG_HYPOTHESIS_PROFILE=review-fuzz $(BIN)/pytest -q -p no:cacheprovider tests/test_review_stateful.py \
	  --hypothesis-show-statistics

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/kidseg bench

setup: system-deps $(VENV)/.deps-installed
	@# the package itself is reinstalled every time (seconds): napari reads the installed manifest
	$(BIN)/pip install -q --no-deps --no-build-isolation --force-reinstall .

system-deps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(VENV)/.deps-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q hatchling ".[testing]"
	touch $@

clean:
	rm -rf $(VENV) build dist *.egg-info
