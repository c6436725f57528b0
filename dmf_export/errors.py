import re


class DMFExportError(Exception):
    """A problem the user can fix (bad file, bad shapes, missing tool).

    The command line prints its message as one line and exits non-zero, without a
    traceback unless ``--debug`` is given.
    """


def summarize(err: BaseException) -> str:
    """``Type: first line`` of an exception from a library, for a one-line user message.

    torch and the ONNX exporter write paragraphs of advice and ANSI colours; the first
    sentence says what went wrong.
    """
    text = str(err).strip()
    # torch.load(weights_only=True) puts the reason after "WeightsUnpickler error:" (an
    # admitted global's own error a blank line further), or alone after its advice
    match = (re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
             or re.search(r"^Weights only load failed.*?\n\s*\n\s*([^\n]+)", text, re.S))
    if match:
        text = match.group(1).split(" Please use")[0]
    line = text.splitlines()[0] if text else ""
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    if len(line) > 120:
        line = line.split(". ")[0]
    return f"{type(err).__name__}: {line}" if line else type(err).__name__
