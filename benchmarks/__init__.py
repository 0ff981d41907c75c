"""Side-by-side measurements of vectorstream (not tests): ingest throughput, backends, quality, scale.

``python -m benchmarks`` runs the suite and writes tables with the machine they ran on to benchmarks/results/.
"""
