"""The HTML report's inline style and script (``report_html.py``): the page loads nothing from elsewhere."""

STYLE = """
:root{font:15px/1.4 system-ui,sans-serif;color:#1b1b1b;background:#fff}
body{margin:0 auto;max-width:1400px;padding:0 1rem 3rem}
nav{position:sticky;top:0;background:#fff;height:2.2rem;box-sizing:border-box;padding:.35rem 0;
border-bottom:1px solid #ddd;z-index:2}
nav a{margin-right:1rem}h2{scroll-margin-top:2.5rem}
table{border-collapse:collapse;font-size:.9rem}th,td{border:1px solid #ccc;padding:.2rem .45rem;text-align:left;
vertical-align:top}.scroll{overflow-x:auto}.config td{word-break:break-word}.config ul{margin:0;padding-left:1.1rem}
code{font-size:.85em;background:#f3f3f3;padding:0 .2em}pre{overflow-x:auto;background:#f7f7f7;padding:.5rem}
.warn{background:#fff4e5;border-left:4px solid #e65100;padding:.3rem .8rem}
.figures{display:flex;flex-wrap:wrap;gap:1rem}.figures figure{margin:0;max-width:min(100%,640px)}
.figures img{max-width:100%;height:auto;border:1px solid #ddd}
.filters{display:flex;flex-wrap:wrap;gap:.5rem 1.2rem;align-items:center;position:sticky;top:2.2rem;background:#f4f6fa;
padding:.5rem .7rem;border:1px solid #d0d7e2;z-index:1}.filters p{margin:0;font-weight:600}
.row{display:grid;grid-template-columns:14rem repeat(5,minmax(0,var(--w)));gap:10px;align-items:start;
border-bottom:1px solid #e2e2e2;padding:.6rem 0}.row[hidden]{display:none}.span{grid-column:span 2}
.info{min-width:0;overflow-wrap:anywhere}.info h3{margin:0;font-size:1rem}.info p{margin:.15rem 0}
.cell{margin:0;min-width:0;font-size:.8rem;overflow-wrap:anywhere}
.cell img,.blank{display:block;width:100%;height:auto;border:1px solid #999;box-sizing:border-box}
.thumbs{display:grid;grid-template-columns:repeat(4,minmax(0,1fr));gap:4px;align-items:start}
@media (max-width:720px){.row{grid-template-columns:repeat(5,minmax(0,var(--w)))}.info{grid-column:1/-1}}
table.results td{white-space:nowrap}
img.px{image-rendering:pixelated}.blank{display:flex;align-items:center;justify-content:center;text-align:center;
background:repeating-linear-gradient(45deg,#f2f2f2 0 6px,#e6e6e6 6px 12px);color:#555;padding:.2rem}
.right{color:#1a6b2e}.wrong{color:#b3261e}.flag{color:#b3261e}.pass{color:#1a6b2e}
.tag{display:inline-block;border-radius:3px;padding:0 .35rem;margin:0 .25rem .2rem 0;font-size:.8rem;color:#fff}
.tag.fixed{background:#1a6b2e}.tag.broken{background:#b3261e}.tag.flag{background:#5b3fa0;color:#fff}
:focus-visible{outline:3px solid #1565c0;outline-offset:2px}select,input{font:inherit}
"""

SCRIPT = """
const rows=[...document.querySelectorAll('#rows .row')], pick=id=>document.getElementById(id);
const selects=['dataset','defense','input'].map(k=>[k,pick('f-'+k)]), checks=['fixed','broken','flagged'];
function update(){
  const kept=rows.filter(r=>selects.every(([k,s])=>!s.value||r.dataset[k]===s.value));
  for(const k of checks) pick('n-'+k).textContent=kept.filter(r=>r.dataset[k]==='1').length;
  let shown=0;
  for(const r of rows){const on=kept.includes(r)&&checks.every(k=>!pick('f-'+k).checked||r.dataset[k]==='1');
    r.hidden=!on; shown+=on;}
  pick('shown').textContent=shown+' of '+rows.length+' rows shown';
  pick('none').hidden=shown>0;
}
for(const [,s] of selects) s.addEventListener('change',update);
for(const k of checks) pick('f-'+k).addEventListener('change',update);
update();
"""
