'use strict';
// plotly.js with only the trace types the dashboard draws (scatter is part of core).
// Keep this list in step with TRACES in build.js and with dashboard/figures.py.
var Plotly = require('plotly.js/lib/core');
Plotly.register([
    require('plotly.js/lib/scattergl'),
    require('plotly.js/lib/heatmap'),
    require('plotly.js/lib/bar'),
    require('plotly.js/lib/icicle'),
]);
module.exports = Plotly;
