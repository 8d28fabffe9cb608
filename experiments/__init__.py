"""The TaskExpert study on the synthetic benchmark: `study` (what is trained), `run` (the resumable runner) and
`report` (docs/results.md, rebuilt from the run folders). Entry point: `make experiments`."""
