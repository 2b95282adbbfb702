#!/usr/bin/env bash
# Medical pipeline: stage 1 -> 2 -> 3 -> medical evaluations + WikiText-2, one table. See scripts/pipeline.sh.
#   bash scripts/medical.sh [MODEL] [--quick|--tiny] [--out DIR] [--fresh]
exec bash "$(dirname "$0")/pipeline.sh" medical "$@"
