"""Side-by-side benchmarks of the node (issue 6): `scripts/bench [--smoke]`.

chat.py (the node against `vllm serve`, driven by `vllm bench serve`), embed.py, audio.py and
overload.py each run one comparison and return table rows and chart series; report.py writes
bench/results/latest.{json,md} and the PNG charts; procs.py owns every child process.
"""
