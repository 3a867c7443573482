#!/usr/bin/env bash
# The quick Table 1 reproduction (2 CPU cores): install, fetch MNIST if missing, sweep, collect.
exec bash "$(dirname "$0")/reproduce.sh" sweeps/table1_cmnist_flip_quick.json "$@"
