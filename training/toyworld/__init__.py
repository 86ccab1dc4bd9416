"""The toy world (issue 13): a procedural world small enough for a CPU, in which the method can be measured."""
