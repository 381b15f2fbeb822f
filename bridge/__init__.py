"""The Kafka bridge: scheduler requests in, deployment events out."""
