"""The faust-streaming application of vectorstream: agents that feed the ``pipeline`` library.

Agents are thin: they turn faust events into records, call the pipeline, produce replies and dead
letters, and ack offsets only after the pipeline confirmed (see ``pipeline.ingest``).
"""
