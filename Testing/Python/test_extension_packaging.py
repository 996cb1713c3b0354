"""Packaging of the 3D Slicer extension: CMake lists, ExtensionsIndex entry, resources, module imports.

Runs in any environment (no Slicer needed): it reads the files as the Slicer build and the
extension index would.
"""
from __future__ import annotations

import ast
import json
import re
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "LesionLocator"
MODULE_PY = MODULE_DIR / "LesionLocator.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "LesionLocator.ui"
ICON = MODULE_DIR / "Resources" / "Icons" / "LesionLocator.png"
REQUIREMENTS = MODULE_DIR / "Resources" / "requirements.txt"
LIB_DIR = REPO / "LesionLocatorLib"

# imports that must never run when Slicer loads the module (missing before 'Install dependencies',
# or slow / Qt-only): allowed inside functions only
HEAVY = {"torch", "LesionLocatorLib", "qt", "ctk", "SimpleITK", "scipy", "dynamic_network_architectures",
         "icon_registration", "requests", "zstandard", "PyTorchUtils", "matplotlib"}


def cmake_set(text: str, name: str) -> list[str]:
    """Values of ``set(NAME ...)`` in a CMake file (quoted strings kept whole, comments dropped)."""
    m = re.search(r"set\(\s*" + re.escape(name) + r"\b(.*?)\)", text, re.S)
    assert m, f"set({name} ...) not found"
    body = re.sub(r"#[^\n]*", "", m.group(1))
    return [a.strip('"') for a in re.findall(r'"[^"]*"|[^\s"]+', body)]


def expand(value: str, text: str) -> str:
    """Expand ${VAR} from other set() calls of the same file."""
    def sub(m):
        return cmake_set(text, m.group(1))[0]

    return re.sub(r"\$\{(\w+)\}", sub, value)


# ----------------------------------------------------------------------------------------------- library
def test_every_library_file_is_packaged():
    text = (LIB_DIR / "CMakeLists.txt").read_text()
    listed = cmake_set(text, "LIB_PYTHON_SCRIPTS")
    on_disk = sorted(p.relative_to(LIB_DIR).as_posix() for p in LIB_DIR.rglob("*.py") if "__pycache__" not in p.parts)
    assert on_disk, "LesionLocatorLib has no .py files?"
    missing = sorted(set(on_disk) - set(listed))
    assert not missing, f"add these to LIB_PYTHON_SCRIPTS in LesionLocatorLib/CMakeLists.txt: {missing}"
    stale = sorted(set(listed) - set(on_disk))
    assert not stale, f"LesionLocatorLib/CMakeLists.txt lists files that do not exist: {stale}"
    assert len(listed) == len(set(listed)), "a file is listed twice"
    assert "WITH_SUBDIR" in text, "the library must be installed in its own folder next to the module"


def test_library_needs_are_covered_by_requirements():
    """Every third-party package the Slicer side imports (all library modules but the server) is installable."""
    req = parse_requirements()
    provided = {r["import"] for r in req} | {"torch"}  # torch: PyTorch extension
    needed = set()
    for path in LIB_DIR.rglob("*.py"):
        if path.name in ("server.py",):  # runs on the server machine, not inside Slicer
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                needed |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                needed.add(node.module.split(".")[0])
    third_party = {m for m in needed if m not in sys.stdlib_module_names and m != "LesionLocatorLib"}
    assert third_party - provided == set(), "add to LesionLocator/Resources/requirements.txt"
    # the network class is imported by name from the plans, not by an import statement
    assert "dynamic_network_architectures" in provided


# ----------------------------------------------------------------------------------------------- requirements
def parse_requirements() -> list[dict]:
    out, no_deps = [], False
    for raw in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            no_deps = no_deps or line.lower().startswith("# [no-deps]")
            continue
        spec, _, comment = line.partition("#")
        m = re.search(r"import:\s*([A-Za-z0-9_.]+)", comment)
        assert m, f"requirement without '# import: NAME': {line!r}"
        out.append({"spec": spec.strip(), "name": re.split(r"[<>=!~\[; ]", spec.strip())[0].lower(),
                    "import": m.group(1), "no_deps": no_deps})
    return out


def test_requirements_file():
    req = {r["name"]: r for r in parse_requirements()}
    assert "torch" not in req, "torch comes from the PyTorch extension (PyTorchUtils), not from pip here"
    for name in ("dynamic-network-architectures", "icon-registration"):
        assert req[name]["no_deps"], f"{name} must be installed with --no-deps"
    assert not any(r["no_deps"] for n, r in req.items() if n not in ("dynamic-network-architectures",
                                                                       "icon-registration"))
    assert req["simpleitk"]["import"] == "SimpleITK"


# ----------------------------------------------------------------------------------------------- extension
def test_extension_cmake_metadata():
    text = (REPO / "CMakeLists.txt").read_text()
    for var in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert cmake_set(text, var), f"{var} is empty"
    assert cmake_set(text, "EXTENSION_CATEGORY") == ["Segmentation"]
    assert cmake_set(text, "EXTENSION_DEPENDS") == ["PyTorch"]
    for needle in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(LesionLocator)",
                   "add_subdirectory(LesionLocatorLib)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                   "include(${Slicer_EXTENSION_CPACK})"):
        assert needle in text, needle
    # the icon and screenshot URLs name files of this repository
    raw = cmake_set(text, "LESIONLOCATOR_RAW_URL")[0]
    for var in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in cmake_set(text, var):
            url = expand(url, text)
            assert url.startswith(raw + "/"), url
            rel = url[len(raw) + 1:]
            assert (REPO / rel).is_file(), f"{var} points at {rel}, which is not in the repository"


def test_extensions_index_entry_matches_cmake():
    entry = json.loads((REPO / "LesionLocator.json").read_text())
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "dicom_support_rule", "build_subdirectory", "enabled", "tier"}  # schema v1.0.2, no extra keys
    assert set(entry) <= allowed, set(entry) - allowed
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert re.search(r"slicer-extension-catalog-entry-schema-v1\.0\.\d+\.json#?$", entry["$schema"])
    text = (REPO / "CMakeLists.txt").read_text()
    depends = cmake_set(text, "EXTENSION_DEPENDS")
    depends = [] if depends == ["NA"] else [d for v in depends for d in v.split(";") if d]
    assert sorted(entry["build_dependencies"]) == sorted(depends)
    assert entry["category"] == cmake_set(text, "EXTENSION_CATEGORY")[0]
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5
    assert entry["scm_url"] == cmake_set(text, "LESIONLOCATOR_REPOSITORY_URL")[0]
    assert entry.get("build_subdirectory", ".") == cmake_set(text, "EXTENSION_BUILD_SUBDIRECTORY")[0]


def test_module_cmake_lists_existing_files():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    name = cmake_set(text, "MODULE_NAME")[0]
    assert name == "LesionLocator"
    for var in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
        for item in cmake_set(text, var):
            path = MODULE_DIR / item.replace("${MODULE_NAME}", name)
            assert path.is_file(), f"{var} lists missing {path}"
    assert "slicerMacroBuildScriptedModule" in text
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py", text)
    resources = [r.replace("${MODULE_NAME}", name) for r in cmake_set(text, "MODULE_PYTHON_RESOURCES")]
    for needed in ("Resources/UI/LesionLocator.ui", "Resources/Icons/LesionLocator.png", "Resources/requirements.txt"):
        assert needed in resources, f"{needed} would be missing from the installed extension"


# ----------------------------------------------------------------------------------------------- resources
def test_icon_is_128px_png():
    data = ICON.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)


def _ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def test_ui_is_valid_and_matches_the_widget_code():
    root = ET.parse(UI_FILE).getroot()  # raises on invalid XML
    assert root.tag == "ui"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "LesionLocator"
    widgets = _ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_PY.read_text(encoding="utf-8")))
    missing = sorted(used - set(widgets))
    assert not missing, f"LesionLocator.py uses widgets that the .ui file does not have: {missing}"
    # MRML widgets get the scene from the top widget
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    mrml = {n for n, w in widgets.items() if w.get("class", "").startswith(("qMRML", "qSlicer")) and n != "LesionLocator"}
    assert mrml <= receivers, f"no setMRMLScene connection for {sorted(mrml - receivers)}"
    # declared custom widgets cover every non-Qt class used
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used_classes = {w.get("class") for w in widgets.values()}
    assert {c for c in used_classes if not c.startswith("Q")} <= declared


def _find_uic() -> str | None:
    import shutil

    for candidate in (shutil.which("uic"), "/usr/lib/qt5/bin/uic", "/usr/lib/qt6/libexec/uic"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def test_ui_compiles_with_qt_uic(tmp_path):
    """Qt's own compiler accepts the form (layouts, property types, enums); optional: needs Qt's uic."""
    import subprocess

    uic = _find_uic()
    if uic is None:
        pytest.skip("Qt uic not installed (Debian: apt-get install qtbase5-dev-tools)")
    out = tmp_path / "ui_LesionLocator.h"
    proc = subprocess.run([uic, str(UI_FILE), "-o", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    code = out.read_text()
    assert "setupUi" in code and "promptPlaceWidget" in code


def test_ui_parameter_names_exist_in_the_parameter_node():
    tree = ast.parse(MODULE_PY.read_text(encoding="utf-8"))
    fields = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "LesionLocatorParameterNode":
            fields = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    assert fields, "LesionLocatorParameterNode not found"
    names = [p.findtext("string") for p in ET.parse(UI_FILE).getroot().iter("property")
             if p.get("name") == "SlicerParameterName"]
    assert names, "no widget is bound to the parameter node"
    assert set(names) <= fields, set(names) - fields
    for p in ET.parse(UI_FILE).getroot().iter("property"):
        if p.get("name") == "SlicerParameterName":
            assert p.get("stdset") == "0", "dynamic properties need stdset=\"0\""


# ----------------------------------------------------------------------------------------------- module code
def _top_level_imports(tree: ast.Module) -> set[str]:
    """Modules imported when the file is loaded: everything outside function bodies."""
    found: set[str] = set()

    def visit(node, in_function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function = True
        if not in_function:
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child, in_function)

    visit(tree, False)
    return found


def test_module_parses_and_imports_nothing_heavy_at_load():
    source = MODULE_PY.read_text(encoding="utf-8")
    tree = ast.parse(source)
    heavy = _top_level_imports(tree) & HEAVY
    assert not heavy, f"LesionLocator.py imports {sorted(heavy)} at load time; import them inside functions"
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"LesionLocator", "LesionLocatorWidget", "LesionLocatorLogic", "LesionLocatorTest"} <= classes


def test_logic_class_has_no_qt():
    tree = ast.parse(MODULE_PY.read_text(encoding="utf-8"))
    logic = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LesionLocatorLogic")
    names = set()
    for node in ast.walk(logic):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Name) and node.id in ("qt", "ctk"):
            names.add(node.id)
    assert not names & {"qt", "ctk"}, "the Logic must run without Qt (slicer-core)"


def test_self_test_class_runs_the_workflow():
    tree = ast.parse(MODULE_PY.read_text(encoding="utf-8"))
    test = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LesionLocatorTest")
    methods = {f.name for f in test.body if isinstance(f, ast.FunctionDef)}
    assert {"runTest", "setUp"} <= methods and any(m.startswith("test_") for m in methods)


def test_library_import_path_setup_finds_the_checkout():
    # the module adds the repository root (parent of LesionLocator/) when LesionLocatorLib is there
    assert (MODULE_DIR.parent / "LesionLocatorLib" / "__init__.py").is_file()
    assert "_ensureLibraryImportable" in MODULE_PY.read_text(encoding="utf-8")


@pytest.mark.parametrize("path", ["README.md"])
def test_docs_exist(path):
    text = (REPO / path).read_text(encoding="utf-8")
    for needle in ("Extension", "PyTorch", "--no-main-window", "server", "licen"):
        assert needle.lower() in text.lower(), needle
