#!/bin/sh
# The image's build stage, as one script the Dockerfile and deploy/check-image.sh both run:
# fastfan from the source tree in the current folder, compiled, into a virtual environment
# at $1 (default /opt/fastfan), on Debian 12 with python3-venv, python3-dev and gcc.
set -eu
prefix=${1:-/opt/fastfan}
python3 -m venv "$prefix"
"$prefix/bin/pip" install --no-cache-dir .
"$prefix/bin/fastfan" --version
