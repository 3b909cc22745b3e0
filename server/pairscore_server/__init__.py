"""pairscore's server: scoring engine, batcher, gRPC servicer, metrics and CLI."""
