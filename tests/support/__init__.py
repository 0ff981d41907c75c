"""Test harnesses: the Apache Kafka broker, fault injection; benchmarks may import them too."""
