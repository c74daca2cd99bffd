// The runs page: refresh the rows of the current page and filters once a second.
"use strict";
(function () {
  const body = document.getElementById("runs-body");
  const query = document.body.dataset.query;
  const page = document.body.dataset.pageNumber;
  const url = "/api/runs?" + (query ? query + "&" : "") + "page=" + page;

  function row(r) {
    const link = RY.el("a", {href: "/runs/" + r.run_id, class: "run-link"}, r.run_id.slice(0, 12));
    const first = RY.el("td", {}, link);
    if (r.parent_run_id) first.append(" ", RY.el("span", {class: "muted", title: "re-execution of " + r.parent_run_id}, "↻"));
    const tags = RY.el("td", {});
    for (const [k, v] of Object.entries(r.tags)) tags.append(RY.el("span", {class: "tag"}, `${k}=${v}`), " ");
    return RY.el("tr", {"data-run-id": r.run_id},
      first, RY.el("td", {}, r.job_name),
      RY.el("td", {}, RY.el("span", {class: "status status-" + r.status}, r.status)),
      RY.el("td", {}, RY.fmtTime(r.created_at)),
      RY.el("td", {class: "duration"}, RY.fmtDuration(r.duration)), tags);
  }

  RY.poll(async () => {
    const data = await RY.getJSON(url);
    document.getElementById("run-count").textContent = data.total;
    document.getElementById("page-count").textContent = data.pages;
    if (!data.runs.length) {
      if (!body.querySelector("tr.empty")) body.replaceChildren(RY.el("tr", {class: "empty"}, RY.el("td", {colspan: "6"}, "No runs on this page any more.")));
      return;
    }
    body.replaceChildren(...data.runs.map(row));
  }, 1000);
})();
