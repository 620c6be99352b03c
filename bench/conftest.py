"""The benchmarks are not tests: keep pytest from collecting anything in bench/."""

collect_ignore_glob = ["*"]
