// The collection map (/-/map): reads its settings from the page's #map-config JSON.
(() => {
  "use strict";
  const config = JSON.parse(document.getElementById("map-config").textContent);
  const wrap = document.getElementById("map-wrap");
  const canvas = document.getElementById("map-canvas");
  const ctx = canvas.getContext("2d");
  const card = document.getElementById("hover-card");
  const cardImg = card.querySelector("img");
  const cardTitle = card.querySelector(".map-card-title");
  const cardLabels = card.querySelector("ul");
  const cardNote = card.querySelector(".map-card-note");
  const filter = document.getElementById("label-filter");
  const showPlaced = document.getElementById("show-placed");
  const message = document.getElementById("map-message");

  const DOT_BELOW = 14;     // px: images smaller than this on screen are drawn as dots
  const MAX_LOADING = 4;    // atlases fetched at once
  const GRID = 128;         // hit-test buckets per side
  const MAX_THUMBNAILS = 1500;  // more images in view than this are drawn as squares: a frame
                                // of 5,000 thumbnails took 480 ms in software rendering
  const SHARP_ABOVE = 80;   // px: images drawn larger than this use their own thumbnail, not the atlas's 64 px tile
  const MAX_SHARP = 300;    // ... when no more than this many are in view
  const SHARP_CACHE = 600;  // thumbnails kept
  const DETAIL_BELOW = 0.5; // a view smaller than this share of the map asks for its own images

  let n = 0, ids, xs, ys, tiles, placed, topLabel, labelsOf, labelNames = [];
  let stride = 1;                    // the answer drawn carries every stride-th image
  let overview = null, detail = null;  // the whole map's data (a sample past 5,000) and the box in view's
  let detailTimer = 0, detailWanted = "";
  const sharp = new Map();           // image id -> {img, ready}: thumbnails for close-ups
  const cards = new Map();           // image id -> its hover card's details
  let atlasInfo = {tile: 64, columns: 16, per_atlas: 256, keys: []};
  let method = "t-SNE";
  let side = 0.02;                   // an image's side, in map units ([0, 1])
  let scale = 1, ox = 0, oy = 0;     // screen = map * scale + offset (CSS pixels)
  let width = 0, height = 0;
  let colours = [], packed;          // a colour per top label: CSS, and as ABGR pixels
  let pixels = null, pixels32;       // the dots' pixel buffer
  let highlight = null;              // Uint8Array: 1 where the filtered label is; null: none
  let hovered = -1;
  let cellStart, cellItems;          // hit-test grid: images by bucket
  const atlases = new Map();         // atlas number -> {img, ready}
  let loading = 0, pending = false, drawnOnce = false, lastDrawMs = 0;
  let placeholders = 0;              // images the last frame drew without their atlas
  let mode = "dots";                 // how the last frame drew the images

  const rgba = (r, g, b) => ((255 << 24) | (b << 16) | (g << 8) | r) >>> 0;  // little-endian
  const BACKGROUND = rgba(0x1d, 0x1f, 0x21), DIMMED = rgba(0x4a, 0x4c, 0x4e);

  function hslToRgb(hue, sat, light) {
    const f = (k) => {
      const a = sat * Math.min(light, 1 - light), m = (k + hue / 30) % 12;
      return Math.round(255 * (light - a * Math.max(-1, Math.min(m - 3, 9 - m, 1))));
    };
    return [f(0), f(8), f(4)];
  }

  const colourOf = (i) => (topLabel[i] >= 0 ? topLabel[i] : labelNames.length);
  const fitScale = () => Math.min(width, height) * 0.94;

  function fit() {
    scale = fitScale();
    ox = (width - scale) / 2;
    oy = (height - scale) / 2;
  }

  function resize() {
    const rect = wrap.getBoundingClientRect();
    const first = width === 0;
    const dpr = window.devicePixelRatio || 1;
    width = rect.width; height = rect.height;
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    if (first) fit();
    schedule();
  }

  function schedule() {
    if (!pending) { pending = true; requestAnimationFrame(draw); }
  }

  function requestAtlas(a) {
    if (atlases.has(a) || loading >= MAX_LOADING || !atlasInfo.keys[a]) return;
    const img = new Image();
    const entry = {img, ready: false};
    atlases.set(a, entry);
    loading++;
    img.onload = () => { entry.ready = true; loading--; schedule(); };
    img.onerror = () => { loading--; schedule(); };  // stays a placeholder
    img.src = config.atlas + a + ".jpg?v=" + encodeURIComponent(atlasInfo.keys[a]);
  }

  // Dots go straight into a pixel buffer: 50k fillRect calls take 100 ms a frame, this a few.
  function drawDots(px, visible) {
    const w = canvas.width, hgt = canvas.height, dpr = w / width;
    if (!pixels || pixels.width !== w || pixels.height !== hgt) {
      pixels = ctx.createImageData(w, hgt);
      pixels32 = new Uint32Array(pixels.data.buffer);
    }
    pixels32.fill(BACKGROUND);
    // A thinned answer (every stride-th image) draws larger dots, so a sample of a large
    // map covers it as densely as all its images would.
    const d = Math.max(2, Math.round(px * Math.min(Math.sqrt(stride), 4) * dpr)), h = d >> 1;
    const dot = (i, colour) => {
      const cx = Math.round((xs[i] * scale + ox) * dpr), cy = Math.round((ys[i] * scale + oy) * dpr);
      const left = Math.max(0, cx - h), right = Math.min(w, cx - h + d);
      for (let y = Math.max(0, cy - h), bottom = Math.min(hgt, cy - h + d); y < bottom; y++) {
        pixels32.fill(colour, y * w + left, y * w + right);
      }
    };
    for (let i = 0; i < n; i++) {  // with a filter: the others dimmed first, the matches on top
      if (visible(i) && !(highlight && highlight[i])) dot(i, highlight ? DIMMED : packed[colourOf(i)]);
    }
    if (highlight) {
      for (let i = 0; i < n; i++) if (highlight[i] && visible(i)) dot(i, packed[colourOf(i)]);
    }
    ctx.putImageData(pixels, 0, 0);
  }

  function sharpThumbnail(i) {
    let entry = sharp.get(ids[i]);
    if (!entry) {
      const img = new Image();
      entry = {img, ready: false};
      sharp.set(ids[i], entry);
      img.onload = () => { entry.ready = true; schedule(); };
      img.src = config.thumbnail + ids[i] + ".jpg";
      for (const key of sharp.keys()) { if (sharp.size <= SHARP_CACHE) break; sharp.delete(key); }
    }
    return entry.ready ? entry.img : null;
  }
  function drawThumbnails(px, visible, close) {
    const t = atlasInfo.tile, cols = atlasInfo.columns, per = atlasInfo.per_atlas;
    const h = px / 2;
    ctx.fillStyle = "#1d1f21";
    ctx.fillRect(0, 0, width, height);
    if (highlight) {  // a halo behind each highlighted image, drawn first so stacks stay visible
      ctx.fillStyle = "#ffcc00";
      for (let i = 0; i < n; i++) {
        if (highlight[i] && visible(i)) ctx.fillRect(xs[i] * scale + ox - h - 3, ys[i] * scale + oy - h - 3, px + 6, px + 6);
      }
    }
    for (let i = 0; i < n; i++) {
      if (!visible(i)) continue;
      const sx = xs[i] * scale + ox - h, sy = ys[i] * scale + oy - h;
      ctx.globalAlpha = highlight && !highlight[i] ? 0.15 : 1;
      const a = Math.floor(tiles[i] / per), slot = tiles[i] % per;
      const entry = atlases.get(a);
      const own = close ? sharpThumbnail(i) : null;
      if (own) {  // the thumbnail cropped to a square, as the atlas tiles are
        const side = Math.min(own.naturalWidth, own.naturalHeight);
        ctx.drawImage(own, (own.naturalWidth - side) / 2, (own.naturalHeight - side) / 2, side, side, sx, sy, px, px);
      } else if (entry && entry.ready) {
        ctx.drawImage(entry.img, (slot % cols) * t, Math.floor(slot / cols) * t, t, t, sx, sy, px, px);
      } else {
        if (atlasInfo.keys[a]) {  // no key: no thumbnails there, the square is all there is
          requestAtlas(a);
          placeholders++;
        }
        ctx.fillStyle = colours[colourOf(i)];
        ctx.fillRect(sx, sy, px, px);
      }
    }
    ctx.globalAlpha = 1;
  }

  function draw() {
    pending = false;
    const started = performance.now();
    placeholders = 0;
    if (!n) {
      ctx.fillStyle = "#1d1f21";
      ctx.fillRect(0, 0, width, height);
      return;
    }
    const px = side * scale;
    // the visible part of the map, widened by an image so edges are not cut off
    const x0 = -ox / scale - side, x1 = (width - ox) / scale + side;
    const y0 = -oy / scale - side, y1 = (height - oy) / scale + side;
    const visible = (i) => xs[i] >= x0 && xs[i] <= x1 && ys[i] >= y0 && ys[i] <= y1;
    let shown = 0;
    if (px >= DOT_BELOW) for (let i = 0; i < n && shown <= MAX_THUMBNAILS; i++) if (visible(i)) shown++;
    mode = px < DOT_BELOW || shown > MAX_THUMBNAILS ? "dots" : "thumbnails";
    if (mode === "dots") drawDots(px, visible);
    else drawThumbnails(px, visible, px > SHARP_ABOVE && shown <= MAX_SHARP);
    const h = Math.max(2, px) / 2;
    if (showPlaced.checked) {
      ctx.strokeStyle = "#fff";
      ctx.lineWidth = 1.5;
      for (let i = 0; i < n; i++) {
        if (placed[i] && visible(i)) ctx.strokeRect(xs[i] * scale + ox - h - 1, ys[i] * scale + oy - h - 1, 2 * h + 2, 2 * h + 2);
      }
    }
    if (hovered >= 0) {
      ctx.strokeStyle = "#fff";
      ctx.lineWidth = 2;
      ctx.strokeRect(xs[hovered] * scale + ox - h - 2, ys[hovered] * scale + oy - h - 2, 2 * h + 4, 2 * h + 4);
    }
    lastDrawMs = performance.now() - started;
    if (!drawnOnce) {
      drawnOnce = true;
      window.mapFirstDrawAt = performance.now();
      canvas.dataset.drawn = String(n);
    }
  }

  function buildGrid() {
    const cell = new Int32Array(n), counts = new Int32Array(GRID * GRID + 1);
    for (let i = 0; i < n; i++) {
      const cx = Math.min(GRID - 1, Math.max(0, Math.floor(xs[i] * GRID)));
      const cy = Math.min(GRID - 1, Math.max(0, Math.floor(ys[i] * GRID)));
      cell[i] = cy * GRID + cx;
      counts[cell[i] + 1]++;
    }
    for (let c = 0; c < GRID * GRID; c++) counts[c + 1] += counts[c];
    cellStart = counts;
    cellItems = new Int32Array(n);
    const fill = counts.slice(0, GRID * GRID);
    for (let i = 0; i < n; i++) cellItems[fill[cell[i]]++] = i;
  }

  // The topmost (last drawn) image under screen point (sx, sy), or -1.
  function hit(sx, sy) {
    if (!n) return -1;
    const wx = (sx - ox) / scale, wy = (sy - oy) / scale;
    const r = Math.max(side, 8 / scale) / 2;  // dots get a few pixels of slack
    const cx0 = Math.max(0, Math.floor((wx - r) * GRID)), cx1 = Math.min(GRID - 1, Math.floor((wx + r) * GRID));
    const cy0 = Math.max(0, Math.floor((wy - r) * GRID)), cy1 = Math.min(GRID - 1, Math.floor((wy + r) * GRID));
    let best = -1;
    for (let cy = cy0; cy <= cy1; cy++) {
      for (let cx = cx0; cx <= cx1; cx++) {
        const c = cy * GRID + cx;
        for (let k = cellStart[c]; k < cellStart[c + 1]; k++) {
          const i = cellItems[k];
          if (i > best && Math.abs(xs[i] - wx) <= r && Math.abs(ys[i] - wy) <= r) best = i;
        }
      }
    }
    return best;
  }

  function showCard(i, sx, sy) {
    if (i !== hovered) {
      hovered = i;
      schedule();
      if (i < 0) { card.hidden = true; canvas.classList.remove("pointing"); return; }
      cardImg.src = config.thumbnail + ids[i] + ".jpg";
      cardImg.alt = "image " + ids[i];
      cardTitle.textContent = "Image " + ids[i];
      cardLabels.replaceChildren(...labelsOf[i].map((l) => {
        const li = document.createElement("li");
        li.textContent = labelNames[l];
        return li;
      }));
      cardNote.textContent = placed[i]
        ? "Placed near its nearest neighbours since the map was computed."
        : "Projected with " + method + ".";
      fillCard(ids[i]);
      card.dataset.imageId = String(ids[i]);
      card.hidden = false;
      canvas.classList.add("pointing");
    }
    if (i >= 0) {
      const w = card.offsetWidth, hgt = card.offsetHeight;
      card.style.left = (sx + 16 + w > width ? Math.max(0, sx - 16 - w) : sx + 16) + "px";
      card.style.top = Math.max(0, Math.min(height - hgt, sy - hgt / 2)) + "px";
    }
  }

  // The card's file name, labels with scores and date, fetched once per image.
  function fillCard(id) {
    const show = (info) => {
      if (card.dataset.imageId !== String(id) || !info) return;
      cardTitle.textContent = info.name;
      cardLabels.replaceChildren(...info.labels.map((l) => {
        const li = document.createElement("li");
        li.textContent = l.label + " (" + Math.round(l.score * 100) + "%)";
        return li;
      }));
      const when = info.taken_at ? "Taken " + info.taken_at.slice(0, 10) : "Added " + (info.added_at || "").slice(0, 10);
      cardNote.textContent = when + ". " + cardNote.textContent;
      card.dataset.filled = "1";
    };
    card.dataset.filled = "";
    if (cards.has(id)) { queueMicrotask(() => show(cards.get(id))); return; }
    fetch(config.card + id + ".json", {credentials: "same-origin"})
      .then((r) => (r.ok ? r.json() : null))
      .then((info) => { cards.set(id, info); show(info); })
      .catch(() => {});
  }
  // Level of detail: past 5,000 images the whole map comes as an even sample; a view zoomed
  // into less than DETAIL_BELOW of it gets the images in a box around it, all of them or
  // a denser sample.
  function wantDetail() {
    clearTimeout(detailTimer);
    detailTimer = setTimeout(() => {
      if (!overview || overview.lod.stride <= 1) return;
      const x0 = -ox / scale, x1 = (width - ox) / scale, y0 = -oy / scale, y1 = (height - oy) / scale;
      if ((x1 - x0) * (y1 - y0) >= DETAIL_BELOW) {
        detailWanted = "";  // an answer still on its way is for a view no longer shown
        if (detail) { detail = null; load(overview); }
        return;
      }
      if (detail) {
        const [bx0, by0, bx1, by1] = detail.lod.box;
        if (x0 >= bx0 && y0 >= by0 && x1 <= bx1 && y1 <= by1 && detail.lod.stride <= 1) return;
      }
      const w = x1 - x0, hh = y1 - y0;
      const box = [x0 - w / 2, y0 - hh / 2, x1 + w / 2, y1 + hh / 2].map((v) => v.toFixed(5)).join(",");
      detailWanted = box;
      fetch(config.data + "?box=" + box, {credentials: "same-origin"})
        .then((r) => (r.ok ? r.json() : null))
        .then((data) => { if (data && detailWanted === box) { detail = data; load(data); } })
        .catch(() => {});
    }, 250);
  }
  function zoomAt(factor, sx, sy) {
    const next = Math.min(Math.max(scale * factor, fitScale() * 0.5), 256 / side);
    ox = sx - (sx - ox) * (next / scale);
    oy = sy - (sy - oy) * (next / scale);
    scale = next;
    schedule();
    wantDetail();
  }

  // A word WordNet knows for a category (dog, canine, automobile) highlights every image
  // in it, every breed under dog; any other text highlights the labels containing it.
  let categoryAsked = 0, categoryTimer = 0, category = null;  // category: {q, name, wnid, ids: Set}
  function applyFilter() {
    const q = filter.value.trim().toLowerCase();
    if (!q) { highlight = null; category = null; message.textContent = ""; schedule(); return; }
    if (category && category.q === q) {
      highlight = new Uint8Array(n);
      let count = 0;
      for (let i = 0; i < n; i++) if (category.ids.has(ids[i])) { highlight[i] = 1; count++; }
      message.textContent = count.toLocaleString() + " image" + (count === 1 ? "" : "s") +
        " in the category “" + category.name + "”";
      schedule();
      return;
    }
    const lower = labelNames.map((name) => name.toLowerCase());
    const exact = lower.indexOf(q);
    const wanted = new Uint8Array(labelNames.length);
    lower.forEach((name, l) => { if (exact >= 0 ? l === exact : name.includes(q)) wanted[l] = 1; });
    highlight = new Uint8Array(n);
    let count = 0;
    for (let i = 0; i < n; i++) {
      if (labelsOf[i].some((l) => wanted[l])) { highlight[i] = 1; count++; }
    }
    message.textContent = count.toLocaleString() + " image" + (count === 1 ? "" : "s") +
      " with a label matching “" + filter.value.trim() + "”";
    schedule();
    clearTimeout(categoryTimer);
    categoryTimer = setTimeout(() => findCategory(q), 250);
  }

  async function findCategory(q) {
    const asked = ++categoryAsked;
    try {
      const found = await (await fetch(config.category_search + "?limit=1&q=" + encodeURIComponent(q))).json();
      const best = found.results && found.results[0];
      // only a whole word of the category: "do" should not turn into "dog"
      if (!best || !best.images || best.matched.toLowerCase() !== q) return;
      const answer = await (await fetch(config.category_ids + best.wnid + "/ids.json")).json();
      if (asked !== categoryAsked || filter.value.trim().toLowerCase() !== q) return;  // typed on since
      category = {q, name: best.name, wnid: best.wnid, ids: new Set(answer.ids)};
      applyFilter();
    } catch (e) {
      // no categories in this collection (404) or the server is away: the label match stands
    }
  }

  let drag = null;
  canvas.addEventListener("pointerdown", (e) => {
    drag = {x: e.offsetX, y: e.offsetY, ox, oy, moved: false};
    canvas.setPointerCapture(e.pointerId);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (drag) {
      const dx = e.offsetX - drag.x, dy = e.offsetY - drag.y;
      if (drag.moved || Math.abs(dx) + Math.abs(dy) > 4) {
        drag.moved = true;
        canvas.classList.add("dragging");
        ox = drag.ox + dx; oy = drag.oy + dy;
        showCard(-1);
        schedule();
        wantDetail();
        return;
      }
    }
    showCard(hit(e.offsetX, e.offsetY), e.offsetX, e.offsetY);
  });
  canvas.addEventListener("pointerup", (e) => {
    const clicked = drag && !drag.moved;
    drag = null;
    canvas.classList.remove("dragging");
    if (clicked) {
      const i = hit(e.offsetX, e.offsetY);
      if (i >= 0) window.location.href = config.similar + ids[i];
    }
  });
  canvas.addEventListener("pointerleave", () => { if (!drag) showCard(-1); });
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    zoomAt(Math.exp(-e.deltaY * (e.deltaMode === 1 ? 0.05 : 0.0015)), e.offsetX, e.offsetY);
  }, {passive: false});
  document.getElementById("zoom-in").addEventListener("click", () => zoomAt(1.6, width / 2, height / 2));
  document.getElementById("zoom-out").addEventListener("click", () => zoomAt(1 / 1.6, width / 2, height / 2));
  document.getElementById("zoom-fit").addEventListener("click", () => { fit(); schedule(); wantDetail(); });
  filter.addEventListener("input", applyFilter);
  showPlaced.addEventListener("change", schedule);
  new ResizeObserver(resize).observe(wrap);

  // For tests and benchmarks: where an image is drawn, in canvas pixels (null: not on the map).
  window.collectionMap = {
    screenPosition(id) {
      const i = n ? ids.indexOf(id) : -1;
      return i < 0 ? null : [xs[i] * scale + ox, ys[i] * scale + oy];
    },
    // true once the last frame drew everything it shows, thumbnails included
    complete: () => drawnOnce && !pending && loading === 0 && placeholders === 0,
    lastDrawMs: () => lastDrawMs,
    mode: () => mode,
    shown: () => n,
  };
  // The hue of a label from its name, so it keeps its colour from one answer to the next.
  function hue(name) {
    let h = 0;
    for (let k = 0; k < name.length; k++) h = (h * 31 + name.charCodeAt(k)) >>> 0;
    return h % 360;
  }
  function load(data) {
    const im = data.images;
    n = im.id.length;
    stride = data.lod.stride || 1;
    ids = im.id; tiles = im.tile; placed = im.placed; topLabel = im.top_label; labelsOf = im.labels;
    xs = Float32Array.from(im.x); ys = Float32Array.from(im.y);
    labelNames = data.label_names;
    atlasInfo = data.atlas;
    // a colour per top label, and grey (last) for no label
    const rgb = labelNames.map((name) => hslToRgb(hue(name), 0.65, 0.58));
    rgb.push([153, 153, 153]);
    colours = rgb.map(([r, g, b]) => `rgb(${r},${g},${b})`);
    packed = Uint32Array.from(rgb, ([r, g, b]) => rgba(r, g, b));
    buildGrid();
    hovered = -1;
    card.hidden = true;
    canvas.dataset.shown = String(n);
    if (filter.value) applyFilter();
    schedule();
  }

  fetch(config.data, {credentials: "same-origin"})
    .then((r) => { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
    .then((data) => {
      window.mapDataAt = performance.now();
      overview = data;
      method = data.projection ? data.projection.method_name : "";
      const total = Math.max(data.lod.total, data.images.id.length);
      side = Math.min(0.08, Math.max(0.003, 0.9 / Math.sqrt(Math.max(total, 1))));
      const list = document.getElementById("map-labels");
      list.replaceChildren(...data.label_names.map((name) => { const o = document.createElement("option"); o.value = name; return o; }));
      load(data);
      message.textContent = data.images.id.length ? "" : "The map is empty.";
      canvas.dataset.count = String(data.images.id.length);
    })
    .catch((err) => { message.textContent = "Could not load the map: " + err.message; });
})();
