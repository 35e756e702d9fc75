"""Test support, not product: doubles of the supervisor's collaborators, shared by tests and benchmarks.

Nothing in elastic imports this package (tests/test_packaging.py checks it), and what it holds may
change without notice. It ships inside the package, as `torch.testing` and `ray.cluster_utils` do,
for two reasons: scripts/bench_control_plane.py runs the real controller over both doubles, and a
stand-in is a Ray actor class, which Ray workers import by its module name (a module under tests/
is importable only where tests/ is on the path). Doubles that only unit tests use stay in tests/
(the controller tests' FakeGroup), as Ray Train keeps its DummyWorkerGroup in train/v2/tests/.

- simulated: SimulatedGroup, N in-memory workers behind the WorkerGroup protocol (no Ray, no
  torch); ManualClock, the injected clock; NullEvents, a counting event sink.
- standin: StandInWorker, an actor that speaks the worker protocol and counts steps on a timer
  (Ray, no torch, no CPU reserved); `measure`, the real controller and RayWorkerGroup over N of them.
"""
