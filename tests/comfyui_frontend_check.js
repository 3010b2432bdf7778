// Loads UI-format workflows into the real ComfyUI frontend (headless Chromium) the way drag-and-drop
// does, and reports for each: the missing node types (the list the "Some Nodes Are Missing" dialog
// gets), nodes the frontend could not create, whether that dialog is shown, the frontend's own API
// prompt (app.graphToPrompt) and its serialisation of the loaded graph (app.graph.serialize).
//
//   node tests/comfyui_frontend_check.js URL OUT.json SHOT_DIR WORKFLOW.json [...]
//
// $SKIPDIT_OBJECT_INFO_PATCH: a JSON file of node schemas ({node type: /object_info entry}) the page is
// given in place of the server's own (its /api/object_info answer is patched on the way), e.g. ComfyUI
// 0.38's CreateVideo and SaveVideo (tests/data/object_info-0.38-video.json), to see how this frontend
// lays out and serialises nodes of a newer server than the one running.
// SHOT_DIR/<workflow name>.png: a screenshot of each loaded workflow. puppeteer-core is taken from
// $SKIPDIT_BROWSER_TOOLS (default tests/browser, installed there with `npm ci` from its package.json),
// Chromium from $CHROME_PATH (default /usr/bin/chromium). Used by tests/test_comfyui_workflows.py.
const fs = require('fs');
const path = require('path');

const tools = process.env.SKIPDIT_BROWSER_TOOLS || path.join(__dirname, 'browser');
const puppeteer = require(require.resolve('puppeteer-core', { paths: [tools, path.join(tools, 'node_modules')] }));
const [url, outFile, shotDir, ...files] = process.argv.slice(2);

(async () => {
  const browser = await puppeteer.launch({
    executablePath: process.env.CHROME_PATH || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  const results = [];
  try {
    const page = await browser.newPage();
    await page.setViewport({ width: 1600, height: 900 });
    const pageErrors = [];
    page.on('pageerror', e => pageErrors.push(String(e.message).split('\n')[0]));
    if (process.env.SKIPDIT_OBJECT_INFO_PATCH) {
      const patch = JSON.parse(fs.readFileSync(process.env.SKIPDIT_OBJECT_INFO_PATCH, 'utf8'));
      delete patch._doc;
      await page.setRequestInterception(true);
      page.on('request', async req => {
        if (!/\/object_info$/.test(new URL(req.url()).pathname)) return req.continue();
        const answer = await (await fetch(req.url())).json();
        req.respond({ status: 200, contentType: 'application/json', body: JSON.stringify({ ...answer, ...patch }) });
      });
    }
    await page.goto(url, { waitUntil: 'networkidle0', timeout: 180000 });
    await page.waitForFunction(
      () => window.app && window.app.graph && window.LiteGraph &&
        Object.keys(window.LiteGraph.registered_node_types).length > 100,
      { timeout: 180000 });
    const frontend = await page.evaluate(() => {
      window.__missing = null;
      window.app.registerExtension({
        name: 'skipdit.test.missingNodes',
        afterConfigureGraph(missing) {
          window.__missing = missing.map(t => (typeof t === 'object' ? t.type : t));
        },
      });
      return window.__COMFYUI_FRONTEND_VERSION__ || null;
    });
    for (const file of files) {
      const wf = JSON.parse(fs.readFileSync(file, 'utf8'));
      const res = await page.evaluate(async (wf) => {
        window.__missing = null;
        document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click());
        const unregistered = [...new Set(wf.nodes.map(n => n.type).filter(t => !(t in LiteGraph.registered_node_types)))];
        await window.app.loadGraphData(wf);
        await new Promise(r => setTimeout(r, 700));
        const dialogs = [...document.querySelectorAll('.p-dialog')].map(d => d.innerText).join('\n');
        const prompt = await window.app.graphToPrompt();
        return {
          unregistered,
          missing: window.__missing,
          errored: app.graph.nodes.filter(n => n.has_errors).map(n => n.type),
          missingDialog: dialogs.includes('Some Nodes Are Missing'),
          nodeCount: app.graph.nodes.length,
          linkCount: Object.keys(app.graph.links || {}).length,
          apiPrompt: prompt.output,
          serialized: app.graph.serialize(),
        };
      }, wf);
      const shot = path.join(shotDir, path.basename(file, '.json') + '.png');
      await page.screenshot({ path: shot });
      results.push({ file, screenshot: shot, ...res });
    }
    fs.writeFileSync(outFile, JSON.stringify({ frontend, pageErrors, results }, null, 1));
  } finally {
    await browser.close();
  }
})().catch(e => { console.error(e); process.exit(2); });
