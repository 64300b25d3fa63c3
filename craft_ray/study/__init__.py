"""Blinded reader study: physicians compare matched images of two or more generators in a web app.

``create`` draws matched pairs from evaluations into a self-contained study folder (:mod:`.create`,
:mod:`.store`), ``serve`` runs the reader app (:mod:`.app`, :mod:`.pages`), ``results`` computes win
rates, sign tests, Bradley-Terry scores and kappas (:mod:`.results`, :mod:`.stats`).
"""
