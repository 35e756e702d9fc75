"""elastic's internals: the supervisor, the worker side, checkpoints and their plumbing.

Nothing here is public API and any of it may change between versions; what users import is what
`elastic/__init__.py` exports and the public modules beside it (trainer, config, context, policy,
callbacks, sampler, train_state, result, errors, cli) and the `elastic.testing` / `elastic.chaos`
test tooling."""
