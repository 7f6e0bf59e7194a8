"""A trial's start: in a new or a reused worker, with and without the frozen collector, from process start
to the first optimizer step."""
