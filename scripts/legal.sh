#!/usr/bin/env bash
# Legal pipeline: stage 1 -> 2 -> 3 -> legal evaluations + WikiText-2, one table. See scripts/pipeline.sh.
#   bash scripts/legal.sh [MODEL] [--quick|--tiny] [--out DIR] [--fresh]
exec bash "$(dirname "$0")/pipeline.sh" legal "$@"
