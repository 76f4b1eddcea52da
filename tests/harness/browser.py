"""Headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) on a test ComfyUI's web UI.

`scripts/dev-setup` installs both (Playwright's own browser download cannot work on a closed
network, so the launch names the system Chromium). `ComfyPage` opens the server's page, waits
until the ComfyUI app is ready, records console errors and uncaught page errors, and loads UI
workflows through the frontend's own `app.loadGraphData`, the path a user's drag-and-drop takes.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 800}
# The frontend's "missing nodes" dialog (comfyui-frontend-package 1.32: missingNodes.oss.title)
# and the older wording, in case the installed frontend differs.
MISSING_NODES_TEXTS = (
    "This workflow has missing nodes",
    "When loading the graph, the following node types were not found",
)
MISSING_NODE_PACKS = "Missing Node Packs"  # a section of the errors/issues panel (frontends 1.49, 1.58)

# Server-side settings for a quiet first visit and readable screenshots: no templates browser
# (shown to new users), no minimap over the graph, full detail when zoomed out. Stored in the test server's own user folder.
QUIET_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,  # fps etc. in the bottom left corner
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,  # titles and widgets drawn at every zoom level
}
# Browser-side: the "Introducing Nodes 2.0" banner is dismissed in localStorage.
_QUIET_INIT_JS = "try { localStorage.setItem('vueNodesBannerDismissed', 'true'); } catch (e) {}"


@dataclass(frozen=True)
class ConsoleError:
    """A console error (or an uncaught page error, with kind "pageerror") and its source URL."""

    text: str
    url: str = ""
    kind: str = "console"

    def __str__(self) -> str:
        return f"{self.kind}: {self.text}" + (f" [{self.url}]" if self.url else "")

    def is_offline_noise(self, server_url: str) -> bool:
        """A failed request to another host: the frontend asks api.comfy.org (release notes,
        node registry) and this machine's closed network refuses it. Not the page's fault."""
        if self.kind != "console" or not self.url or not self.text.startswith("Failed to load resource"):
            return False
        return urlparse(self.url).netloc != urlparse(server_url).netloc

    def mentions_any(self, words: list[str]) -> bool:
        haystack = f"{self.text} {self.url}".lower()
        return any(word.lower() in haystack for word in words)


def quiet_first_visit(server_url: str) -> None:
    """Store QUIET_SETTINGS on the server before the page loads (the page reads them once)."""
    request = urllib.request.Request(
        server_url + "/settings",
        data=json.dumps(QUIET_SETTINGS).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


# Runs in the page: what the loaded graph holds, and what is wrong with it.
_INSPECT_GRAPH_JS = """
(workflow) => {
  const registered = LiteGraph.registered_node_types;
  const graph = app.graph;
  const graphs = [graph, ...(graph.subgraphs ? graph.subgraphs.values() : [])];
  const nodes = graphs.flatMap((g) => g.nodes ?? g._nodes ?? []);
  const unregistered = nodes
    .filter((n) => !(n.type in registered))
    .map((n) => ({ id: n.id, type: n.type, title: n.title }));
  // Also the file's own node types (the frontend renames unknown ones while loading).
  const fileNodes = [...(workflow.nodes ?? [])];
  for (const sg of workflow.definitions?.subgraphs ?? []) fileNodes.push(...(sg.nodes ?? []));
  const unregisteredInFile = [...new Set(fileNodes.map((n) => n.type).filter((t) => !(t in registered)))];

  const links = graph.links instanceof Map ? [...graph.links.values()] : Object.values(graph.links ?? {});
  // Frontends from 1.4x keep node ids as strings ("5"); the files and older frontends use numbers.
  const id = (v) => (typeof v === "string" && String(Number(v)) === v ? Number(v) : v);
  const broken = [];
  for (const link of links) {
    if (!link) continue;
    const origin = graph.getNodeById(link.origin_id);
    const target = graph.getNodeById(link.target_id);
    const why = [];
    if (!origin) why.push(`origin node ${link.origin_id} does not exist`);
    if (!target) why.push(`target node ${link.target_id} does not exist`);
    const output = origin?.outputs?.[link.origin_slot];
    const input = target?.inputs?.[link.target_slot];
    if (origin && !output) why.push(`origin node ${link.origin_id} has no output ${link.origin_slot}`);
    if (target && !input) why.push(`target node ${link.target_id} has no input ${link.target_slot}`);
    if (output && !(output.links ?? []).map(id).includes(id(link.id))) why.push("the output does not list the link");
    if (input && id(input.link) !== id(link.id)) why.push(`the input holds link ${input.link}`);
    if (output && input && !LiteGraph.isValidConnection(output.type, input.type))
      why.push(`type ${output.type} -> ${input.type}`);
    if (why.length) broken.push({ id: link.id, why: why.join("; ") });
  }
  // Inputs that name a link the graph does not have.
  for (const node of graph.nodes ?? graph._nodes ?? []) {
    for (const [slot, input] of (node.inputs ?? []).entries()) {
      if (input.link != null && !links.some((l) => l && id(l.id) === id(input.link)))
        broken.push({ id: input.link, why: `node ${node.id} (${node.type}) input ${slot} names a missing link` });
    }
  }
  const fileLinks = workflow.links ?? [];
  return {
    nodeCount: (graph.nodes ?? graph._nodes).length,
    fileNodeCount: (workflow.nodes ?? []).length,
    linkCount: links.filter(Boolean).length,
    fileLinkCount: fileLinks.length,
    links: links
      .filter(Boolean)
      .map((l) => [id(l.id), id(l.origin_id), l.origin_slot, id(l.target_id), l.target_slot, l.type]),
    types: [...new Set(nodes.map((n) => n.type))].sort(),
    unregistered,
    unregisteredInFile,
    broken,
  };
}
"""

# Fit the view to the graph (nodes and groups), tighter than the frontend's "Fit view": the
# canvas fills the window, so keep clear of the side bar (left), the tab bar, breadcrumb and
# Run toolbar (top) and the zoom controls (bottom right). `area` is [x, y, width, height] in
# screen pixels.
_FIT_VIEW_JS = """
(area) => {
  const rect = (item) => {
    const r = item.boundingRect ?? item._bounding;
    if (r && r.length === 4) return [r[0], r[1], r[2], r[3]];
    const title = LiteGraph.NODE_TITLE_HEIGHT;
    return [item.pos[0], item.pos[1] - title, item.size[0], item.size[1] + title];
  };
  const items = [...(app.graph.nodes ?? app.graph._nodes), ...(app.graph.groups ?? app.graph._groups ?? [])];
  if (!items.length) return null;
  let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
  for (const item of items) {
    const [x, y, w, h] = rect(item);
    x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
  }
  const [ax, ay, aw, ah] = area;
  const scale = Math.min(aw / (x1 - x0), ah / (y1 - y0), 1.5);
  const ds = app.canvas.ds;
  ds.scale = scale;
  ds.offset[0] = (ax + (aw - (x1 - x0) * scale) / 2) / scale - x0;
  ds.offset[1] = (ay + (ah - (y1 - y0) * scale) / 2) / scale - y0;
  app.graph.setDirtyCanvas(true, true);
  app.canvas.draw(true, true);
  return { scale, bounds: [x0, y0, x1 - x0, y1 - y0] };
}
"""


# Nodes (title bar included) that lie outside the visible canvas at the current zoom.
_OFF_SCREEN_JS = """
() => {
  const canvas = app.canvas.canvas;
  const [w, h] = [canvas.clientWidth, canvas.clientHeight];
  const title = LiteGraph.NODE_TITLE_HEIGHT;
  const out = [];
  for (const n of app.graph.nodes ?? app.graph._nodes) {
    const [x0, y0] = app.canvas.ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - title]);
    const [x1, y1] = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
    if (x0 < -1 || y0 < -1 || x1 > w + 1 || y1 > h + 1) out.push(`${n.id} ${n.type}`);
  }
  return out;
}
"""


@dataclass
class ComfyPage:
    """One page on the ComfyUI web UI, with what the console and the page reported."""

    page: object  # playwright.sync_api.Page
    errors: list[ConsoleError] = field(default_factory=list)
    server_url: str = ""

    def clear_errors(self) -> None:
        self.errors.clear()

    def open(self, url: str, timeout: float = 60.0) -> ComfyPage:
        """Load the web UI and wait until `app`, its graph and its canvas exist and the node
        definitions are registered."""
        self.server_url = url.rstrip("/")
        self.page.goto(url, wait_until="domcontentloaded", timeout=timeout * 1000)
        self.page.wait_for_function(
            """() => window.app && app.graph && app.canvas && document.querySelector('canvas')
                 && window.LiteGraph && Object.keys(LiteGraph.registered_node_types).length > 10
                 && app.extensionManager""",
            timeout=timeout * 1000,
        )
        self.close_dialogs()
        return self

    def frontend_version(self) -> str | None:
        """The version the running frontend reports about itself."""
        return self.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? null")

    def settle(self, ms: int = 300) -> None:
        """Let the frontend finish what it queued (dialogs, redraws, image previews)."""
        self.page.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
        self.page.wait_for_timeout(ms)

    def load_workflow(self, workflow: dict, name: str | None = None) -> dict:
        """Load a UI-format workflow the way a user's drop of file `name` does (missing-node and
        missing-model dialogs on; the tab is named after the file); return `inspect_graph`'s
        report."""
        self.page.evaluate(
            "async ([wf, name]) => { await app.loadGraphData(wf, true, true, name); }", [workflow, name]
        )
        self.settle()
        return self.inspect_graph(workflow)

    def inspect_graph(self, workflow: dict) -> dict:
        return self.page.evaluate(_INSPECT_GRAPH_JS, workflow)

    def registered_node_types(self) -> list[str]:
        return self.page.evaluate("() => Object.keys(LiteGraph.registered_node_types)")

    def dialog_texts(self) -> list[str]:
        """The text of every open dialog (PrimeVue dialogs, ARIA dialogs)."""
        return self.page.evaluate(
            """() => [...document.querySelectorAll('[role="dialog"], .p-dialog')]
                    .filter((d) => d.offsetParent !== null || d.getClientRects().length)
                    .map((d) => d.innerText.trim())"""
        )

    def missing_nodes_dialog(self, open_issues: bool = False) -> str | None:
        """The missing-nodes dialog's text if one is open (or anywhere in the page). Frontends
        from 1.5x show a "N issues found" toast instead; with `open_issues` its details are
        opened and their "Missing Node Packs" section is returned (1.49: "N errors found")."""
        body = self.page.inner_text("body")
        for text in MISSING_NODES_TEXTS:
            if text in body:
                return "\n".join(t for t in self.dialog_texts() if text in t) or text
        if not open_issues or not re.search(r"\d+ (issues?|errors?) found", body):
            return None
        self.page.get_by_text("View details").first.click()
        self.settle(1000)
        details = self.page.inner_text("body")
        if MISSING_NODE_PACKS not in details:
            return None
        section = details[details.index(MISSING_NODE_PACKS) :]
        return section.split("Missing Models")[0].strip()

    def close_dialogs(self) -> None:
        for _ in range(3):
            if not self.dialog_texts():
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(150)

    def fit_view(self) -> dict | None:
        """Zoom and pan so the whole graph fills the free part of the window; return the scale."""
        w, h = self.page.viewport_size["width"], self.page.viewport_size["height"]
        fit = self.page.evaluate(_FIT_VIEW_JS, [72, 100, w - 84, h - 150])
        self.settle()
        return fit

    def off_screen_nodes(self) -> list[str]:
        return self.page.evaluate(_OFF_SCREEN_JS)

    def wait_for_image_previews(self, timeout: float = 10.0) -> bool:
        """Wait until every node's image preview (LoadImage's) has loaded; False on timeout."""
        try:
            self.page.wait_for_function(
                """() => (app.graph.nodes ?? app.graph._nodes).every(
                       (n) => !n.imgs || n.imgs.every((img) => img.complete && img.naturalWidth > 0))""",
                timeout=timeout * 1000,
            )
        except Exception:  # playwright's TimeoutError; the caller decides whether it matters
            return False
        self.settle()
        return True

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), type="png")
        return path


class Browser:
    """Playwright + Debian's Chromium with a fresh profile; `new_page()` gives ComfyPages."""

    def __init__(self, viewport: dict | None = None):
        self.viewport = viewport or VIEWPORT
        self._playwright = None
        self._context = None
        self._profile: str | None = None

    def start(self) -> Browser:
        if not CHROMIUM.exists():
            raise RuntimeError(
                f"{CHROMIUM} is missing: run scripts/dev-setup (it installs Debian's chromium)"
            )
        try:
            from playwright.sync_api import sync_playwright
        except ImportError as error:
            raise RuntimeError("playwright is not installed in this venv: run scripts/dev-setup") from error
        self._profile = tempfile.mkdtemp(prefix="pva-chromium-")
        self._playwright = sync_playwright().start()
        try:
            # A persistent context is how Playwright takes a user-data-dir: a fresh one each run.
            self._context = self._playwright.chromium.launch_persistent_context(
                self._profile,
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_ARGS,
                viewport=self.viewport,
                device_scale_factor=1,
            )
        except Exception:
            self.stop()
            raise
        return self

    def new_page(self) -> ComfyPage:
        page = self._context.new_page()
        page.add_init_script(_QUIET_INIT_JS)
        comfy = ComfyPage(page)

        def on_console(message) -> None:
            if message.type == "error":
                url = (message.location or {}).get("url", "")
                comfy.errors.append(ConsoleError(message.text, url))

        def on_page_error(error) -> None:
            comfy.errors.append(
                ConsoleError(f"{error.name}: {error.message}\n{error.stack or ''}", kind="pageerror")
            )

        page.on("console", on_console)
        page.on("pageerror", on_page_error)
        return comfy

    def stop(self) -> None:
        if self._context is not None:
            self._context.close()
            self._context = None
        if self._playwright is not None:
            self._playwright.stop()
            self._playwright = None
        if self._profile:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    def __enter__(self) -> Browser:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def read_workflow(path: Path) -> dict:
    return json.loads(Path(path).read_text())
