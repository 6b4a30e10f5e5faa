"""The two usage examples of the seed package's README (pytorch-parametrizations 1.0.0), run with spectral_cli.

Only the import lines change. Their printed output must equal the README's "# Output:" blocks exactly, and the
output of the same examples run with the real seed package.

The README is embedded below so the test runs without ../shared; when the shared copy exists, the embedded text is
checked against it.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

SHARED_README = Path(__file__).resolve().parents[2] / "shared" / "spec" / "pytorch-parametrizations-README.md"

SEED_IMPORTS = (
    "from pytorch_parametrizations import SpectralParametrization",
    "from pytorch_parametrizations.spectral.utils import register_spectral_parametrization",
)
OUR_IMPORTS = (
    "from spectral_cli import SpectralParametrization",
    "from spectral_cli.spectral.utils import register_spectral_parametrization",
)

# The two ```python blocks of the README, verbatim.
EXAMPLE_1 = """\
import torch
import torch.nn.utils.parametrize as parametrize

from pytorch_parametrizations import SpectralParametrization

# Create a 2D convolutional layer
conv = torch.nn.Conv2d(in_channels=3, out_channels=64, kernel_size=3, padding=1)

# Register the spectral parametrization for the weights of the layer
parametrize.register_parametrization(conv, 'weight', SpectralParametrization(conv.kernel_size), unsafe=True)


print(conv.parametrizations.weight)
# Output:
# conv.parametrizations.weight
# ParametrizationList(
#   (0): SpectralParametrization()
# )
"""

EXAMPLE_2 = """\
import torch
from pytorch_parametrizations.spectral.utils import register_spectral_parametrization

# Create a module
module = torch.nn.Sequential(
    torch.nn.Conv2d(in_channels=3, out_channels=64, kernel_size=3, padding=1),
    torch.nn.ReLU(),
    torch.nn.Conv2d(in_channels=64, out_channels=64, kernel_size=3, padding=1),
    torch.nn.ReLU(),
    torch.nn.Conv2d(in_channels=64, out_channels=3, kernel_size=3, padding=1),
    torch.nn.Sigmoid()
)

# Register the spectral parametrization for every Conv2d and ConvTranspose2d layer in the module
register_spectral_parametrization(module)

print(module)
# Output:
# Sequential(
#   (0): ParametrizedConv2d(
#     3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)
#     (parametrizations): ModuleDict(
#       (weight): ParametrizationList(
#         (0): SpectralParametrization()
#       )
#     )
#   )
#   (1): ReLU()
#   (2): ParametrizedConv2d(
#     64, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)
#     (parametrizations): ModuleDict(
#       (weight): ParametrizationList(
#         (0): SpectralParametrization()
#       )
#     )
#   )
#   (3): ReLU()
#   (4): ParametrizedConv2d(
#     64, 3, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)
#     (parametrizations): ModuleDict(
#       (weight): ParametrizationList(
#         (0): SpectralParametrization()
#       )
#     )
#   )
#   (5): Sigmoid()
# )

# Unregister the spectral parametrization for every Conv2d and ConvTranspose2d layer in the module
register_spectral_parametrization(module, undo=True)

print(module)
# Output:
# Sequential(
#   (0): Conv2d(3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
#   (1): ReLU()
#   (2): Conv2d(64, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
#   (3): ReLU()
#   (4): Conv2d(64, 3, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
#   (5): Sigmoid()
# )
"""

EXAMPLES = {"example_1": EXAMPLE_1, "example_2": EXAMPLE_2}


def python_blocks(markdown: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)]


def split_at_outputs(code: str) -> list[tuple[str, str, list[str]]]:
    """Cut an example into (code to run, printed expression, expected lines) at each "# Output:" comment block."""
    segments: list[tuple[str, str, list[str]]] = []
    lines = code.splitlines()
    chunk: list[str] = []
    i = 0
    while i < len(lines):
        if lines[i] == "# Output:":
            expected = []
            i += 1
            while i < len(lines) and lines[i].startswith("#"):
                expected.append(lines[i][2:] if lines[i].startswith("# ") else lines[i][1:])
                i += 1
            prints = [ln for ln in chunk if ln.startswith("print(")]
            expression = prints[-1][len("print(") : -1] if prints else ""
            segments.append(("\n".join(chunk) + "\n", expression, expected))
            chunk = []
            continue
        chunk.append(lines[i])
        i += 1
    assert not "".join(chunk).strip(), "code after the last output block"
    return segments


def expected_output(expression: str, expected: list[str]) -> str:
    """The README's expected lines as printed text.

    The first block of the README starts with a caption line that repeats the printed expression
    ("conv.parametrizations.weight"); print() never writes that (the seed package itself does not, see
    test_seed_package_prints_the_same), so a leading line equal to the printed expression is a caption, not output.
    """
    if expected and expected[0] == expression:
        expected = expected[1:]
    return "\n".join(expected) + "\n"


def with_imports(code: str, imports: tuple[str, ...]) -> str:
    for seed, ours in zip(SEED_IMPORTS, imports, strict=True):
        assert code.count(seed) <= 1
        code = code.replace(seed, ours)
    return code


def run_example(code: str, imports: tuple[str, ...]) -> list[str]:
    """Run an example segment by segment in one namespace; return what each segment printed."""
    namespace: dict[str, object] = {"__name__": "__readme__"}
    printed = []
    for segment, _, _ in split_at_outputs(with_imports(code, imports)):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(compile(segment, "<README>", "exec"), namespace)
        printed.append(buffer.getvalue())
    return printed


def test_embedded_readme_matches_shared_copy() -> None:
    if not SHARED_README.exists():
        pytest.skip("the shared copy of the seed README is not here (CI)")
    blocks = python_blocks(SHARED_README.read_text(encoding="utf-8"))
    assert blocks == [EXAMPLE_1, EXAMPLE_2]


def test_examples_have_the_expected_shape() -> None:
    # guards the parser: two output blocks in example 2, one in example 1, each non-empty
    assert [len(split_at_outputs(code)) for code in EXAMPLES.values()] == [1, 2]
    for code in EXAMPLES.values():
        for segment, expression, expected in split_at_outputs(code):
            assert expected and expression and f"print({expression})" in segment
        assert sum(code.count(seed) for seed in SEED_IMPORTS) == 1
        assert sum(with_imports(code, OUR_IMPORTS).count(ours) for ours in OUR_IMPORTS) == 1
        assert "pytorch_parametrizations" not in with_imports(code, OUR_IMPORTS)


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_readme_output_exactly(name: str) -> None:
    torch.manual_seed(0)
    code = EXAMPLES[name]
    printed = run_example(code, OUR_IMPORTS)
    expected = [expected_output(expression, lines) for _, expression, lines in split_at_outputs(code)]
    assert printed == expected


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_seed_package_prints_the_same(name: str) -> None:
    pytest.importorskip("pytorch_parametrizations")
    torch.manual_seed(0)
    code = EXAMPLES[name]
    ours = run_example(code, OUR_IMPORTS)
    seed = run_example(code, SEED_IMPORTS)
    assert ours == seed
    expected = [expected_output(expression, lines) for _, expression, lines in split_at_outputs(code)]
    assert seed == expected
