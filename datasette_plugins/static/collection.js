// The collection plugin's small behaviours: fold a table's column descriptions, and
// keep the status page current.
document.addEventListener("DOMContentLoaded", () => {
  // A table's twenty column descriptions otherwise fill the first screen.
  document.querySelectorAll("dl.column-descriptions").forEach((list) => {
    const details = document.createElement("details");
    details.className = "collection-columns";
    const summary = document.createElement("summary");
    summary.textContent = `Column descriptions (${list.querySelectorAll("dt").length})`;
    list.replaceWith(details);
    details.append(summary, list);
  });

  const status = document.querySelector("[data-status-url]");
  if (status) {
    const url = status.dataset.statusUrl;
    const has = (section) => status.querySelector(`[data-key^="${section}."]`) !== null;
    const lookup = (data, key) => key.split(".").reduce((v, k) => (v == null ? v : v[k]), data);
    const refresh = async () => {
      try {
        const response = await fetch(url, { headers: { Accept: "application/json" } });
        if (response.ok) {
          const data = await response.json();
          if ((data.watcher != null) !== has("watcher") || (data.map != null) !== has("map")) {
            window.location.reload(); // a watcher or a map appeared (or went): redraw the sections
            return;
          }
          status.querySelectorAll("[data-key]").forEach((el) => {
            const value = lookup(data, el.dataset.key);
            el.textContent = value == null ? el.dataset.empty || "" : String(value);
          });
        }
      } finally {
        setTimeout(refresh, 1000);
      }
    };
    setTimeout(refresh, 1000);
  }
});
