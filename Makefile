# napari-uhrseg — two commands on a fresh machine:
#   make demo   set up .venv and run the main job (napari with the sample scene and the plugin's docks;
#               headless under Xvfb when there is no display, writing labels and a screenshot to demo_out/)
#   make test   set up what the tests need (Xvfb and Mesa included) and run the suite
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.uhrseg-installed
XVFB := xvfb-run -a -s "-screen 0 1600x1000x24"
APT_PKGS := xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 \
	libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-cursor0 \
	libdbus-1-3 libfontconfig1

.PHONY: demo test test-all bench venv sysdeps docs-images clean

# An installed torch >= 2.2 is reused (the venv then sees the system site-packages); with none, the local
# CPU wheel torch==2.13.0 goes in first so that pip never resolves `torch` to the multi-GB CUDA build.
$(VPY):
	@if $(PY) -c "import sys, torch; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(0 if v >= (2, 2) else 1)" 2>/dev/null; then \
		echo "reusing the installed torch"; $(PY) -m venv --system-site-packages $(VENV); \
	else \
		$(PY) -m venv $(VENV); \
	fi
	$(VPY) -m pip install -q --upgrade pip
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0

$(STAMP): $(VPY) pyproject.toml
	$(VPY) -m pip install -q -e ".[testing]"
	@touch $(STAMP)

venv: $(STAMP)

# Xvfb and Mesa give napari's canvas real OpenGL without a display (Qt's offscreen platform has none).
sysdeps:
	@if ! command -v xvfb-run >/dev/null 2>&1; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null; \
		else \
			echo "xvfb-run is missing: install these packages as root: $(APT_PKGS)"; exit 1; \
		fi; \
	fi

test: venv sysdeps
	QT_QPA_PLATFORM=xcb $(XVFB) $(VPY) -m pytest -q -p no:cacheprovider

# Slow tests too (still no benchmarks).
test-all: venv sysdeps
	QT_QPA_PLATFORM=xcb $(XVFB) $(VPY) -m pytest -q -m "not benchmark"

demo: venv
	@if [ -n "$$DISPLAY" ] || [ -n "$$WAYLAND_DISPLAY" ]; then \
		$(VPY) -m napari_uhrseg.demo; \
	else \
		$(MAKE) --no-print-directory sysdeps && QT_QPA_PLATFORM=xcb $(XVFB) $(VPY) -m napari_uhrseg.demo --headless --out demo_out; \
	fi

docs-images: venv sysdeps
	QT_QPA_PLATFORM=xcb $(XVFB) $(VPY) scripts/docs_images.py

bench: venv
	$(VPY) benchmarks/io.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache build src/*.egg-info
