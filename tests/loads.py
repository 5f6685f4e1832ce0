"""Record what each model and tokenizer load was asked to trust, for the remote-code tests."""
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer


def record_trust_remote_code(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object]]:
    """(class name, trust_remote_code passed or "unset") for every from_pretrained call from now on."""
    calls = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained

        def record(*args, _real=real, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs.get("trust_remote_code", "unset")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", record)
    return calls
