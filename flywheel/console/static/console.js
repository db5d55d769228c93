// The labelling queue's keyboard shortcuts (the console's only script; the CSP allows scripts from
// /static only). 1-9 pick an intent, a takes the corrector's suggested answer, Enter saves the label,
// f says the answer was fine, s skips. Keys typed into a text field are left to the field, except
// Enter with Ctrl/Cmd, which saves from there too.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  var form = document.querySelector("form[data-labelling]");
  if (!form) return;
  var answer = document.getElementById("answer");
  var suggestion = document.getElementById("suggestion");
  var accept = document.getElementById("accept");
  var fine = document.getElementById("fine-form");
  var skip = document.getElementById("skip");
  var sent = false;

  function send(which) {
    if (sent) return; // one submit per page: a held key does not label twice
    sent = true;
    which.requestSubmit();
  }
  function useSuggestion() {
    if (suggestion && answer) answer.value = suggestion.textContent;
  }
  if (accept) accept.addEventListener("click", useSuggestion);
  form.addEventListener("submit", function () { sent = true; });

  document.addEventListener("keydown", function (event) {
    var target = event.target;
    var typing = target && (target.tagName === "TEXTAREA" || (target.tagName === "INPUT" && target.type !== "radio"));
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      send(form);
      return;
    }
    if (typing || event.altKey || event.ctrlKey || event.metaKey) return;
    if (/^[1-9]$/.test(event.key)) {
      var radio = form.querySelector('input[type=radio][data-key="' + event.key + '"]');
      if (radio) { radio.checked = true; radio.focus(); event.preventDefault(); }
    } else if (event.key === "a") {
      useSuggestion(); event.preventDefault();
    } else if (event.key === "Enter") {
      event.preventDefault(); send(form);
    } else if (event.key === "f" && fine) {
      event.preventDefault(); send(fine);
    } else if (event.key === "s" && skip) {
      event.preventDefault(); window.location.href = skip.href;
    }
  });
});
