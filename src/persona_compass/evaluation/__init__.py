"""Scenario evaluation: does activation capping keep a model's Assistant persona, and its
good behaviour, over long drifting conversations?

Building blocks (each its own module):

* :mod:`.scenarios` - scripted multi-turn conversations in seven domains (package data);
* :mod:`.capability` - an exact-match capability set with confidence intervals;
* :mod:`.users` - who plays the user: the script, a local model, or an OpenAI-compatible server;
* :mod:`.outcomes` - judges that label each assistant answer (harmful compliance, delusion
  validation, referral, refusal).
"""
