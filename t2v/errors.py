"""Errors a user can act on: each names the field and what it allows."""


class T2VError(Exception):
    """Base class for t2v errors."""


class JobCancelled(T2VError):
    """Raised from a sampling loop's step callback when its job was cancelled: the loop stops at that step."""


class InputError(T2VError, ValueError):
    """A request field outside what the model or the library supports."""

    def __init__(self, field: str, message: str, allowed: str | None = None):
        self.field = field
        self.message = message
        self.allowed = allowed
        text = f"{field}: {message}"
        if allowed:
            text += f" (allowed: {allowed})"
        super().__init__(text)

    def __reduce__(self):  # picklable (Ray sends it from a replica to the Ingress)
        return type(self), (self.field, self.message, self.allowed)


class BundleError(T2VError, ValueError):
    """A model path or URI that is missing or is not a diffusers-format video bundle."""

    def __init__(self, uri: str, message: str):
        self.field = "model"
        self.uri = uri
        self.message = message
        super().__init__(f"model: {uri!s}: {message}")

    def __reduce__(self):
        return type(self), (self.uri, self.message)


class StorageError(T2VError, OSError):
    """A store (a folder or s3://) that refused a read or write, after the S3 client's own retries (boto3's
    retry policy: AWS_MAX_ATTEMPTS, AWS_RETRY_MODE)."""

    def __init__(self, uri: str, action: str, reason: str):
        self.uri, self.action, self.reason = uri, action, reason
        super().__init__(f"could not {action} {uri}: {reason}")

    def __reduce__(self):
        return type(self), (self.uri, self.action, self.reason)
