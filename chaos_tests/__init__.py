"""The chaos suite: seeded fault schedules against real runs (CI subset in pytest, full matrix in
`python -m chaos_tests.matrix`)."""
