// Search by example. On /-/search: an image dropped anywhere on the page, pasted, or
// chosen is posted at once with the page's form (its CSRF token included) and the
// server's results replace the old ones, beside a preview of the image made here (the
// server never stores it). Without this script the form posts and the server renders the page.
// On an image page: drag a rectangle over the picture and search for that region.
document.addEventListener("DOMContentLoaded", () => {
  const form = document.querySelector("form.collection-search-form");
  if (form) searchForm(form);
  const region = document.querySelector("[data-region-search]");
  if (region) regionSelect(region);
});

function searchForm(form) {
  const input = form.querySelector("input[type=file]");
  const drop = form.querySelector("[data-drop]");
  let results = document.getElementById("collection-search-results");
  let previewUrl = null;

  const show = (file) => {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
  };
  const choose = (file) => {
    const files = new DataTransfer();
    files.items.add(file);
    input.files = files.files;
    show(file);
    form.requestSubmit();
  };
  const firstFile = (list) => Array.from(list || []).find((file) => file.type.startsWith("image/")) || (list || [])[0];

  input.addEventListener("change", () => {
    if (input.files.length) {
      show(input.files[0]);
      form.requestSubmit();
    }
  });
  // A drop anywhere on the page: aiming at the box is not needed.
  document.addEventListener("dragover", (event) => {
    if (!event.dataTransfer.types.includes("Files")) return;
    event.preventDefault();
    drop.classList.add("collection-drop-over");
  });
  document.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) drop.classList.remove("collection-drop-over");
  });
  document.addEventListener("drop", (event) => {
    drop.classList.remove("collection-drop-over");
    const file = firstFile(event.dataTransfer.files);
    if (!file) return;
    event.preventDefault();
    choose(file);
  });
  document.addEventListener("paste", (event) => {
    const file = firstFile(event.clipboardData && event.clipboardData.files);
    if (!file) return; // text pasted into the number fields stays theirs
    event.preventDefault();
    choose(file);
  });

  const say = (message) => {
    const note = document.createElement("p");
    note.className = "collection-banner collection-search-error";
    note.textContent = message;
    results.replaceChildren(note);
  };

  form.addEventListener("submit", async (event) => {
    if (!input.files.length) return; // nothing chosen: the server says so
    event.preventDefault();
    form.classList.add("collection-busy");
    results.setAttribute("aria-busy", "true");
    const note = document.createElement("p");
    note.className = "collection-status";
    note.textContent = `Searching for ${input.files[0].name}…`;
    results.replaceChildren(note);
    try {
      const token = form.querySelector("input[name=csrftoken]"); // none under Datasette 1.0
      const headers = token ? { Accept: "text/html", "x-csrftoken": token.value } : { Accept: "text/html" };
      const response = await fetch(form.action, { method: "POST", body: new FormData(form), headers });
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const answer = page.getElementById("collection-search-results");
      if (!answer) {
        const text = (page.body && page.body.textContent.trim()) || response.statusText;
        say(`Not searched (${response.status}): ${text.slice(0, 300)}`);
        return;
      }
      results.replaceWith(answer);
      results = answer;
      const slot = results.querySelector("[data-query-preview]");
      if (slot && previewUrl) {
        const img = document.createElement("img");
        img.src = previewUrl;
        img.alt = "your image";
        slot.replaceChildren(img);
      }
    } catch (error) {
      say(`The search did not reach the server: ${error.message}`);
    } finally {
      form.classList.remove("collection-busy");
      results.removeAttribute("aria-busy");
    }
  });
}

// The rectangle is kept as fractions of the picture (left, top, right, bottom), the
// units /-/search?image_id=..&box=.. takes, so it stays put when the page is resized.
function regionSelect(wrap) {
  const img = wrap.querySelector("img");
  const box = wrap.querySelector(".collection-region-box");
  const bar = document.querySelector(".collection-region-bar");
  const go = bar.querySelector("a");
  const clear = bar.querySelector("button");
  const hint = bar.querySelector("span");
  let start = null; // where the drag began, while dragging
  let region = null;
  let dragged = false; // a drag's pointerup is followed by a click on the link: not a navigation

  img.draggable = false;
  const at = (event) => {
    const r = img.getBoundingClientRect();
    const clamp = (v) => Math.min(1, Math.max(0, v));
    return [clamp((event.clientX - r.left) / r.width), clamp((event.clientY - r.top) / r.height)];
  };
  const draw = () => {
    box.hidden = region === null;
    go.hidden = clear.hidden = region === null;
    hint.hidden = region !== null;
    if (region === null) return;
    const [l, t, r, b] = region;
    Object.assign(box.style, {
      left: `${l * 100}%`, top: `${t * 100}%`, width: `${(r - l) * 100}%`, height: `${(b - t) * 100}%`,
    });
    const url = new URL(wrap.dataset.regionSearch, window.location.href);
    url.searchParams.set("image_id", wrap.dataset.imageId);
    url.searchParams.set("box", region.map((v) => v.toFixed(4)).join(","));
    go.href = url.pathname + url.search;
  };
  const reset = () => {
    start = null;
    region = null;
    draw();
  };

  wrap.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return;
    event.preventDefault();
    start = at(event);
    dragged = false;
  });
  wrap.addEventListener("pointermove", (event) => {
    if (start === null) return;
    const [x, y] = at(event);
    const r = img.getBoundingClientRect();
    if (!dragged && Math.hypot((x - start[0]) * r.width, (y - start[1]) * r.height) < 5) return;
    if (!dragged) wrap.setPointerCapture(event.pointerId); // only now: a plain click still opens the link
    dragged = true;
    region = [Math.min(start[0], x), Math.min(start[1], y), Math.max(start[0], x), Math.max(start[1], y)];
    draw();
  });
  const finish = () => {
    start = null;
    if (region && (region[2] - region[0] < 0.01 || region[3] - region[1] < 0.01)) reset();
  };
  wrap.addEventListener("pointerup", finish);
  wrap.addEventListener("pointercancel", finish);
  wrap.addEventListener("click", (event) => {
    if (dragged) event.preventDefault(); // the end of a drag, not a click on the picture
    dragged = false;
  }, true);
  clear.addEventListener("click", reset);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") reset();
  });
  draw();
}
