"""Around the model, what turns one prompt into a finished video: prompt analysis and rewriting (prompting),
shot plans (planner), one request end to end (generate: plan, keyframes, windows, post-processing), frame
post-processing (postprocess) and whole programmes (programs: education, ad, news)."""
