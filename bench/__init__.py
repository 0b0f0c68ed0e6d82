"""The benchmark harness: start each step, check its answers, load it with Locust, report.

python -m bench --profile quick            run every step that exists
python -m bench check --results DIR        compare ratios in a run against bench/floors.json
python -m bench history [--append DIR]     chart (or extend) bench/history.jsonl
"""
