/* Progressive enhancement only: every page works without this file.
   A form or link marked data-fill="#target" loads its answer into the target instead of
   the whole page (Test connection's ladder); an element with data-refresh="seconds" is
   reloaded from its data-src now and then (live outbox states). */
"use strict";
document.addEventListener("submit", async (event) => {
  const form = event.target;
  const target = form.dataset && form.dataset.fill && document.querySelector(form.dataset.fill);
  if (!target) return;
  event.preventDefault();
  target.setAttribute("aria-busy", "true");
  const response = await fetch(form.action, {
    method: form.method.toUpperCase(), body: new FormData(form),
    headers: { "X-Fragment": "1" }, credentials: "same-origin",
  });
  target.innerHTML = await response.text();
  target.removeAttribute("aria-busy");
  target.focus();
});
function refresh(element) {
  const seconds = Number(element.dataset.refresh) || 5;
  setTimeout(async () => {
    const response = await fetch(element.dataset.src, { headers: { "X-Fragment": "1" }, credentials: "same-origin" });
    if (response.ok) element.innerHTML = await response.text();
    refresh(element);
  }, seconds * 1000);
}
document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-refresh][data-src]").forEach(refresh);
});
