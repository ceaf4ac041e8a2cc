"""A stand-in for Ray's driver API (what hdkd.training.ray_executor calls of ``ray``): each task runs when submitted,
in this process, on a 'node' that keeps none of its files; tests that need no real cluster use it."""

from __future__ import annotations

from pathlib import Path


class Ref:
    def __init__(self, name, result=None, error=None):
        self.name, self.result, self.error = name, result, error


class FakeRay:
    """What the driver calls of ``ray``; a task runs when submitted, on a node that keeps none of its files, and
    finishes when waited for, in the order submitted (one cancelled before then never finishes)."""

    def __init__(self, initialized=False, failing=(), finished=()):
        # failing: runs (their names) whose task raises; finished: runs whose task had finished when cancelled
        self.initialized, self.failing, self.finished = initialized, set(failing), set(finished)
        self.inits, self.submitted, self.cancelled, self.shutdowns = [], [], [], 0

    def is_initialized(self):
        return self.initialized

    def init(self, **kwargs):
        self.inits.append(kwargs)
        self.initialized = True

    def shutdown(self):
        self.shutdowns += 1
        self.initialized = False

    def cluster_resources(self):
        return {"CPU": 2.0}

    def nodes(self):
        return [{"NodeManagerAddress": "127.0.0.1", "Alive": True}]

    def remote(self, fn):
        ray = self

        class Task:
            def __init__(self, options=None):
                self.options_ = options or {}

            def options(self, **options):
                return Task(options)

            def remote(self, *args):
                ray.submitted.append((self.options_, args))
                name = self.options_["name"]
                if name.rsplit(" ", 1)[-1] in ray.failing:
                    return Ref(name, error=RuntimeError(f"{name} failed"))
                files = fn(*args)
                for path in files:  # the node is another machine: the driver must write the files itself
                    Path(path).unlink()
                return Ref(name, result=files)

        return Task()

    def wait(self, refs, num_returns=1):
        if not isinstance(num_returns, int) or not 1 <= num_returns <= len(refs):
            raise ValueError(f"num_returns {num_returns!r} of {len(refs)} refs")  # as Ray refuses it
        return refs[:num_returns], refs[num_returns:]  # in the order submitted

    def get(self, ref):
        if ref.error is not None:
            raise ref.error
        return ref.result

    def cancel(self, ref):  # as if still running (its get raises), unless it had finished
        self.cancelled.append(ref.name)
        if ref.name.rsplit(" ", 1)[-1] not in self.finished:
            ref.error = RuntimeError(f"{ref.name} cancelled")
