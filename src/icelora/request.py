"""An edit request: the fact to write into the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from icelora.errors import InvalidRequestError


@dataclass(frozen=True)
class EditRequest:
    """A new fact: ``prompt`` should be continued by ``target``.

    ``contexts`` are sentences stating the new fact (used by the ICE objectives; generated from
    templates when empty). ``subject`` is the entity the fact is about, used by the templates.
    """

    prompt: str
    target: str
    subject: str | None = None
    contexts: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("prompt", "target"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise InvalidRequestError(f"{name} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise InvalidRequestError(f"{name} is empty")
        if self.subject is not None and not isinstance(self.subject, str):
            raise InvalidRequestError(f"subject must be a string, got {type(self.subject).__name__}")
        contexts = tuple(self.contexts)
        for i, context in enumerate(contexts):
            if not isinstance(context, str) or not context.strip():
                raise InvalidRequestError(f"context {i} is empty")
        object.__setattr__(self, "prompt", self.prompt.strip())
        object.__setattr__(self, "target", self.target.strip())
        object.__setattr__(self, "contexts", tuple(c.strip() for c in contexts))
        if self.subject is not None:
            object.__setattr__(self, "subject", self.subject.strip() or None)

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as kept in an adapter's edit ledger."""
        return {"prompt": self.prompt, "target": self.target, "subject": self.subject,
                "contexts": list(self.contexts)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditRequest:
        """Inverse of :meth:`to_dict`; also accepts KnowEdit's ``target_new`` and ICE's ``context``."""
        if not isinstance(data, dict):
            raise InvalidRequestError(f"an edit request must be an object, got {type(data).__name__}")
        target = data.get("target", data.get("target_new"))
        contexts = data.get("contexts", data.get("context")) or ()
        if isinstance(contexts, str):
            contexts = (contexts,)
        for key, value in (("prompt", data.get("prompt")), ("target", target)):
            if value is None:
                raise InvalidRequestError(f"field {key!r} is missing")
        return cls(prompt=data["prompt"], target=target, subject=data.get("subject"), contexts=tuple(contexts))
