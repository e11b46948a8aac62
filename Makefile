# Set-up lives here so the README's two commands work on a fresh Debian machine:
# a virtualenv with kdbench and its dependencies, and Debian's offline Fashion-MNIST.
VENV ?= .venv
PYTHON ?= python3
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: bench test setup

# The main job: train a vgg13 teacher and a vgg8 baseline with the short recipe, print the table.
bench: setup
	$(VENV)/bin/kdbench run --methods student --pairs vgg13:vgg8 --dataset fashion-mnist --recipe short

test: setup
	$(VENV)/bin/python -m pytest

setup: $(VENV)/.installed $(FASHION_MNIST)

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $@

$(FASHION_MNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist
