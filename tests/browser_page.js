// Page-side helpers for tests/test_browser.py, installed as window.__cns by tests/browser.py.
//
// They use only what the ComfyUI frontend itself exposes (window.app, window.LiteGraph and, in the 1.x frontend, its
// Pinia stores), so the tests drive the page the way a user's actions do; the same code has to work on the pip
// frontend 1.32.9 (ComfyUI 0.3.75) and on the 2024 frontend bundled in ComfyUI a28a9dc, hence the fallbacks.
(() => {
  const nodesOf = (graph) => graph._nodes ?? graph.nodes
  // 1.x keeps links in a Map, the 2024 LiteGraph in a plain object keyed by id
  const linkOf = (graph, id) => (graph.links.get ? graph.links.get(id) : graph.links[id])
  const frames = (n) => new Promise((resolve) => {
    const step = (k) => (k ? requestAnimationFrame(() => step(k - 1)) : resolve())
    step(n)
  })
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
  // The 1.x frontend's Pinia instance (its stores by id in _s); undefined on the 2024 frontend, which has none
  const pinia = () =>
    document.getElementById('vue-app')?.__vue_app__?.config?.globalProperties?.$pinia ?? app.extensionManager?._p
  const store = (id) => pinia()?._s?.get(id)

  const widget = (node, name) => {
    const w = (node.widgets || []).find((w) => w.name === name)
    if (!w) throw new Error(`${node.type} #${node.id} has no widget "${name}"`)
    return w
  }

  // CLIPTextEncode -> SuiteTestConditioning (a test-only node: random conditioning of CLIP's shape, seeded by the
  // prompt text as tests/test_workflows.py's substitute() does), created through LiteGraph like a node the user adds
  // from the library, with the same links out; the tiny test checkpoint has no CLIP to encode text with.
  function replaceTextEncode(graph, node) {
    const text = String(widget(node, 'text').value)
    const seed = [...text].reduce((s, ch) => s + ch.codePointAt(0), 0) % 1000
    const cond = LiteGraph.createNode('SuiteTestConditioning')
    if (!cond) throw new Error('SuiteTestConditioning is not registered: are the test nodes linked into the server?')
    cond.pos = [node.pos[0], node.pos[1]]
    cond.title = `${node.title || node.type} (test conditioning)`
    graph.add(cond)
    widget(cond, 'seed').value = seed
    widget(cond, 'width').value = 768
    const control = (cond.widgets || []).find((w) => w.name === 'control_after_generate')
    if (control) control.value = 'fixed'
    const targets = (node.outputs[0].links || []).map((id) => linkOf(graph, id)).map((l) => [l.target_id, l.target_slot])
    for (const [id, slot] of targets) cond.connect(0, graph.getNodeById(id), slot)
    graph.remove(node)
    return { replaced: node.id, by: cond.id, seed, targets }
  }

  window.__cns = {
    ready() {
      return !!(window.app?.graph && app.canvas && window.LiteGraph?.registered_node_types?.KSampler)
    },

    /** app.loadGraphData as the frontend's own file open does, then a few frames so the canvas has drawn it. The
     * 1.x frontend's missing-models dialog is turned off (its 5th argument; the 2024 frontend ignores it): the test
     * server has only the tiny models, and the dialog would cover the graph. */
    async load(json, name = null) {
      await app.loadGraphData(json, true, true, name, { showMissingModelsDialog: false })
      await frames(3)
      // LoadImage previews load asynchronously: wait (a little) for them so screenshots show them
      for (let i = 0; i < 40; i++) {
        const pending = nodesOf(app.graph).filter((n) => n.type === 'LoadImage' && !(n.imgs?.length && n.imgs.every((im) => im.complete)))
        if (!pending.length) break
        await sleep(50)
      }
      app.graph.setDirtyCanvas(true, true)
      await frames(2)
      return true
    },

    serialize() {
      return JSON.parse(JSON.stringify(app.graph.serialize()))
    },

    view() {
      return { scale: app.canvas.ds.scale, offset: Array.from(app.canvas.ds.offset) }
    },

    /** Where the frontend files each of `names`: LiteGraph's registered type (the canvas' Add Node menu) and, in 1.x,
     * the node definitions store and the node library's category tree built from it. */
    library(names) {
      const defs = store('nodeDef')
      const out = {}
      for (const name of names) {
        const entry = { litegraph: LiteGraph.registered_node_types[name]?.category ?? null }
        if (defs) {
          const def = defs.nodeDefsByName[name]
          entry.store = def ? def.category : null
          entry.visible = defs.visibleNodeDefs.some((d) => d.name === name)
          // walk the node library tree (root -> category segments -> the node's leaf)
          let node = defs.nodeTree
          const path = []
          for (const part of (def?.nodePath ?? name).split('/')) {
            node = node?.children?.find((c) => c.label === part)
            if (!node) break
            path.push(part)
          }
          entry.tree = node?.leaf && node.data?.name === name ? path.slice(0, -1).join('/') : null
        }
        out[name] = entry
      }
      return { frontend: defs ? '1.x' : '2024', nodes: out }
    },

    /** Each node's box on the screen, and the points of a 6x6 grid over it (2 px inside) where something other than
     * the canvas (or the node's own DOM widgets) is on top, or that lie outside the window: what the user cannot see. */
    visibility() {
      const canvas = app.canvas.canvas
      const c = canvas.getBoundingClientRect()
      const { scale, offset } = app.canvas.ds
      const nodes = []
      for (const n of nodesOf(app.graph)) {
        const [x, y, w, h] = n.getBounding ? n.getBounding() : n.boundingRect
        const left = c.left + (x + offset[0]) * scale
        const top = c.top + (y + offset[1]) * scale
        const rect = { left, top, right: left + w * scale, bottom: top + h * scale }
        const hidden = []
        for (let i = 0; i < 6; i++) {
          for (let j = 0; j < 6; j++) {
            const px = rect.left + 2 + ((rect.right - rect.left - 4) * i) / 5
            const py = rect.top + 2 + ((rect.bottom - rect.top - 4) * j) / 5
            const hit = document.elementFromPoint(px, py)
            if (hit === canvas || hit?.closest?.('.dom-widget, .comfy-multiline-input')) continue
            const by = hit ? `${hit.tagName.toLowerCase()}.${String(hit.className).trim().split(/\s+/).slice(0, 3).join('.')}` : 'outside the window'
            hidden.push({ x: Math.round(px), y: Math.round(py), by })
          }
        }
        nodes.push({ id: n.id, type: n.type, title: n.title, rect, hidden: hidden.slice(0, 4), hiddenCount: hidden.length })
      }
      return { canvas: c.toJSON(), window: [innerWidth, innerHeight], view: this.view(), nodes }
    },

    /** The tests' tiny models and sizes, set through the loaded graph's widgets (what a user would change by hand). */
    swap(o) {
      const graph = app.graph
      const set = (n, name, v) => (widget(n, name).value = v)
      const trains = nodesOf(graph).some((n) => n.type === 'ControlNetSuiteTrain')
      let k = 0
      const done = []
      for (const n of [...nodesOf(graph)]) {
        switch (n.type) {
          case 'CheckpointLoaderSimple':
            set(n, 'ckpt_name', trains ? o.trainCheckpoint : o.checkpoint)
            break
          case 'ControlNetSuiteTrain': // one step on the 2-pair dataset, as tests/test_workflows.py runs it
            set(n, 'steps', 1)
            set(n, 'batch_size', 2)
            set(n, 'resolution', o.size)
            set(n, 'resume', false)
            break
          case 'ControlNetSuiteLoader': // a union file (by name or title) gets the tiny union, the others the plain ones
            if (/union|promax/i.test(`${widget(n, 'control_net_name').value} ${n.title}`)) set(n, 'control_net_name', o.union)
            else set(n, 'control_net_name', o.controlnets[k++ % o.controlnets.length])
            break
          case 'EmptyLatentImage':
            set(n, 'width', o.size)
            set(n, 'height', o.size)
            break
          case 'SolidMask':
          case 'MaskComposite': // 512 px masks -> 64 px, the latent's pixel size
            for (const w of n.widgets || [])
              if (['width', 'height', 'x', 'y'].includes(w.name)) w.value = Math.max(Math.floor(w.value / 8), ['x', 'y'].includes(w.name) ? 0 : 1)
            break
          case 'KSampler':
            set(n, 'steps', o.steps)
            break
          case 'CLIPTextEncode':
            done.push(replaceTextEncode(graph, n))
            break
        }
      }
      graph.setDirtyCanvas(true, true)
      return done
    },

    /** Queue the graph as the Queue/Run button does: app.queuePrompt(number, batchCount). It resolves once the
     * server answered. Its return value says nothing: 1.32.9 returns !lastNodeErrors, and the server's node_errors
     * is {} for an accepted prompt, so false; the 2024 frontend returns nothing. The node errors are what counts. */
    async queue() {
      const result = await app.queuePrompt(0, 1)
      const errors = store('execution')?.lastNodeErrors ?? app.lastNodeErrors ?? null
      return { result: result ?? null, nodeErrors: errors && Object.keys(errors).length ? errors : null }
    },

    /** 1.x: the workflow templates store as the template browser fills it (after Comfy.BrowseTemplates). */
    templateStore(module) {
      const s = store('workflowTemplates')
      if (!s?.isLoaded) return null
      const extensions = s.navGroupedTemplates.find((item) => (item.items || []).some((i) => i.id === `extension-${module}`))
      return {
        navGroup: extensions?.title ?? null,
        navItems: (extensions?.items || []).map((i) => ({ id: i.id, label: i.label })),
        names: s.filterTemplatesByCategory(`extension-${module}`).map((t) => t.name),
      }
    },

    /** The template browser dialog's cards (data-testid template-workflow-NAME) and whether the dialog is open. */
    templateCards() {
      const cards = [...document.querySelectorAll('[data-testid^="template-workflow-"]')]
      return {
        open: !!document.querySelector('[data-testid="template-workflows-content"]'),
        names: cards.map((c) => c.dataset.testid.slice('template-workflow-'.length)),
      }
    },

    /** Click the element whose own text is exactly `text` (a nav item, a button), inside `within` if given. */
    clickText(text, within) {
      const root = within ? document.querySelector(within) : document
      const el = [...(root?.querySelectorAll('*') || [])].find((e) => e.children.length === 0 && e.textContent.trim() === text)
      if (!el) return false
      ;(el.closest('button, a, [role="button"], [class*="cursor-pointer"]') || el).click()
      return true
    },

    /** The keys of the frontend's open dialogs (1.x dialog store; none on the 2024 frontend). */
    dialogs() {
      return (store('dialog')?.dialogStack ?? []).map((d) => d.key)
    },

    closeDialogs() {
      const s = store('dialog')
      while (s?.dialogStack.length) s.closeDialog({ key: s.dialogStack[s.dialogStack.length - 1].key })
      return true
    },

    click(selector) {
      const el = document.querySelector(selector)
      if (!el) return false
      el.click()
      return true
    },
  }
})()
