"""The loader node shows the library's own message, class and file name for a malformed file (issue 12, item 4)."""
import pytest
from corrupt_files import CORPUS
from host import PromptFailed
from test_nodes import run_one

from controlnet_core import ControlNetError, load_control


@pytest.mark.parametrize("case", ["negative offsets", "non-finite weights", "config zero heads"])
def test_loader_node_shows_the_library_message(host, case):
    path = CORPUS[case][0](host.dirs["controlnet"] / f"corrupt_{case.replace(' ', '_')}.safetensors")
    with pytest.raises(ControlNetError) as library:
        load_control(path)
    node = host.nodes.NODE_CLASS_MAPPINGS["ControlNetSuiteLoader"]()
    with pytest.raises(ValueError) as shown:  # the node package's own copy of the ControlNetError classes
        node.load(path.name)
    assert type(shown.value).__name__ == type(library.value).__name__
    assert str(shown.value) == f"Load ControlNet (Suite): {library.value}"
    with pytest.raises(PromptFailed) as run:
        run_one(host, name=path.name)
    assert str(library.value) in str(run.value)
