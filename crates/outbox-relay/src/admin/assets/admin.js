// The admin's only script (no build step): submits action forms to the JSON API with the CSRF
// token, asks for the count first where the form says so, and refreshes live views in place.
(function () {
  "use strict";
  const meta = (name) => {
    const el = document.querySelector('meta[name="' + name + '"]');
    return el ? el.content : "";
  };
  const csrf = meta("csrf-token");
  const prefix = meta("admin-prefix");

  // Form fields as a JSON object: `name[]` collects an array, data-type="number" sends a number,
  // unchecked boxes and empty fields are left out.
  function formJson(form) {
    const out = {};
    for (const el of form.elements) {
      if (!el.name || el.disabled) continue;
      if ((el.type === "checkbox" || el.type === "radio") && !el.checked) continue;
      let value = el.value;
      if (value === "") continue;
      if (el.dataset.type === "number") value = Number(value);
      if (el.dataset.type === "bool") value = value === "true";
      if (el.name.endsWith("[]")) {
        const key = el.name.slice(0, -2);
        (out[key] = out[key] || []).push(value);
      } else {
        out[el.name] = value;
      }
    }
    return out;
  }

  async function post(path, body) {
    const response = await fetch(prefix + path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body),
    });
    let data = {};
    try {
      data = await response.json();
    } catch (e) {
      data = { message: "HTTP " + response.status };
    }
    return { status: response.status, data: data };
  }

  function say(form, text, ok) {
    let out = form.querySelector(".result");
    if (!out) {
      out = document.createElement("p");
      form.appendChild(out);
    }
    out.className = "result " + (ok ? "ok" : "err");
    out.setAttribute("role", "status");
    out.textContent = text;
  }

  document.addEventListener("submit", async (event) => {
    const form = event.target.closest("form[data-api]");
    if (!form) return;
    event.preventDefault();
    const path = form.dataset.api;
    const body = formJson(form);
    if (form.dataset.confirm === "count") {
      const dry = await post(path, Object.assign({}, body, { dry_run: true }));
      if (dry.status !== 200) {
        say(form, dry.data.message || "HTTP " + dry.status, false);
        return;
      }
      if (dry.data.count === 0) {
        say(form, "nothing matches", false);
        return;
      }
      if (!window.confirm(form.dataset.verb + " " + dry.data.count + " message(s)?")) return;
      body.expect = dry.data.count;
    } else if (form.dataset.confirm) {
      if (!window.confirm(form.dataset.confirm)) return;
    }
    const result = await post(path, body);
    if (result.status === 200) {
      say(form, form.dataset.done || "done", true);
      window.setTimeout(() => window.location.reload(), 800);
    } else {
      say(form, result.data.message || "HTTP " + result.status, false);
    }
  });

  const live = document.querySelector("main[data-refresh]");
  if (live) {
    window.setInterval(async () => {
      if (document.hidden) return;
      const response = await fetch(window.location.href, { credentials: "same-origin" });
      if (!response.ok) return;
      const doc = new DOMParser().parseFromString(await response.text(), "text/html");
      const next = doc.querySelector("main[data-refresh]");
      if (next) live.innerHTML = next.innerHTML;
    }, Number(live.dataset.refresh) * 1000);
  }
})();
