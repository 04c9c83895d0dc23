"""Errors a user can act on: each message says what was expected, what was found, and what to do."""

import copyreg


class Eagle3CacheError(Exception):
    """Base for errors reported to the user without a traceback."""

    def __reduce__(self):
        # Rebuilt from its message and attributes, not by calling its class with them: a subclass's
        # constructor takes other arguments. Rank 0's start-up error reaches every rank pickled.
        return copyreg.__newobj__, (type(self), *self.args), self.__dict__


class ConfigError(Eagle3CacheError, ValueError):
    """A flag has an invalid value; raised before any data or weights load."""

    def __init__(self, flag: str, value, expected: str, hint: str = ""):
        message = f"{flag}: expected {expected}, got {value!r}"
        if hint:
            message += f". {hint}"
        super().__init__(message)
        self.flag = flag


class InputError(Eagle3CacheError, ValueError):
    """The input data cannot be read as chat rows."""


class BadRowError(Eagle3CacheError, ValueError):
    """--strict and a row is invalid."""


class ResumeMismatch(Eagle3CacheError):
    """--resume on a cache built with different identity fields."""

    def __init__(self, differences: dict, hint: str = ""):
        lines = [f"  {field}: cache has {old!r}, this run has {new!r}" for field, (old, new) in sorted(differences.items())]
        super().__init__(
            "--resume: the cache in the output directory was built with different settings, so it cannot be "
            "continued:\n" + "\n".join(lines) + "\nUse the original settings, or a new --output-dir." + (f" {hint}" if hint else "")
        )
        self.differences = differences


class ResumeSamplesDiffer(Eagle3CacheError):
    """--resume on a cache whose finished shards hold other samples than this run would write into
    them (tokenized otherwise, or other rows found valid), though its identity matches."""


class NonFiniteOutput(Eagle3CacheError):
    """--strict and the target produced NaN or Inf for a sample, or it did for every sample."""


class WriteFailed(Eagle3CacheError):
    """Writing the cache failed (its permissions, an I/O error); complete shards stay valid."""


class DiskFull(WriteFailed):
    """Writing failed for lack of space; complete shards stay valid."""


class ProcessCountMismatch(Eagle3CacheError):
    """The accelerate state a caller created before `build` counts other processes than the
    torch.distributed group they run in: each would build alone, as rank 0."""


class OutputDirNotShared(Eagle3CacheError):
    """The processes of a build do not all see rank 0's --output-dir: it names a folder on each node's
    own disk, or a relative path launched from other working directories."""


class ShardRecordsMissing(Eagle3CacheError):
    """Every rank finished, but rank 0 finds no record of some shards: their ranks wrote elsewhere."""


class OtherRankStopped(Eagle3CacheError):
    """A rank finished its shards, but another stopped before finishing its own (its output says why)."""


class ShardUnreadable(Eagle3CacheError):
    """--resume could not read a shard to check it is complete; it was left as it is."""


class HeadMismatch(Eagle3CacheError):
    """The builder's head path (`lm_head` plus the logit terms it knows) does not reproduce the
    target's own `forward` logits: the model applies a term the builder does not know."""

    def __init__(self, architecture: str, path: str, max_diff: float, tolerance: float, dtype: str):
        super().__init__(
            f"--target-model: the {architecture} target's own forward gives logits that differ from the builder's "
            f"head path ({path}) by up to {max_diff:.3g} (tolerance {tolerance:.3g} for {dtype}), so a cache would "
            "not match live supervision: the model applies a logit term (a bias, multiplier or cap after lm_head) "
            "the builder does not know. Use a target whose logits are lm_head plus the terms builder.target.head_spec "
            "reads, or add this architecture's term there."
        )
        self.architecture, self.max_diff, self.tolerance = architecture, max_diff, tolerance
